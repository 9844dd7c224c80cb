// Ansible managed (roles/gateway/examples/lab: the lab registry rendered)
// Generated from the model registry (llm_registry) and llm_services; router.js imports it.
export default {
  "cache": {
    "path": "/var/cache/nginx/llm",
    "purgePath": "/admin/cache"
  },
  "endpoints": [
    {
      "body": "json",
      "name": "chat",
      "path": "/v1/chat/completions"
    },
    {
      "body": "json",
      "name": "completions",
      "path": "/v1/completions"
    },
    {
      "body": "json",
      "name": "embeddings",
      "path": "/v1/embeddings"
    },
    {
      "body": "json",
      "name": "rerank",
      "path": "/v1/rerank"
    },
    {
      "body": "json",
      "name": "responses",
      "path": "/v1/responses"
    },
    {
      "body": "json",
      "name": "score",
      "path": "/v1/score"
    },
    {
      "body": "json",
      "name": "tokenize",
      "path": "/tokenize"
    },
    {
      "body": "json",
      "name": "detokenize",
      "path": "/detokenize"
    },
    {
      "body": "multipart",
      "name": "audio_transcriptions",
      "path": "/v1/audio/transcriptions"
    },
    {
      "body": "multipart",
      "name": "audio_translations",
      "path": "/v1/audio/translations"
    }
  ],
  "health": {
    "staleAfter": 23,
    "stateFile": "/run/llm-gateway-health/state.json"
  },
  "maxBodySize": "16m",
  "models": [
    "chat-small",
    "chat-large",
    "all-minilm-l6-v2"
  ],
  "owner": "llm-gateway",
  "retryAfter": 5,
  "routes": {
    "all-minilm-l6-v2": {
      "aliases": [
        "text-embedding-3-small"
      ],
      "endpoints": [
        "embeddings"
      ],
      "engine": "infinity",
      "id": "all-minilm-l6-v2",
      "paths": {
        "embeddings": "/embeddings"
      },
      "upstream": "llm_all_minilm_l6_v2"
    },
    "chat-large": {
      "aliases": [],
      "endpoints": [
        "chat",
        "completions",
        "responses",
        "score",
        "tokenize",
        "detokenize"
      ],
      "engine": "command",
      "id": "chat-large",
      "paths": {
        "chat": "/v1/chat/completions",
        "completions": "/v1/completions",
        "detokenize": "/detokenize",
        "responses": "/v1/responses",
        "score": "/v1/score",
        "tokenize": "/tokenize"
      },
      "upstream": "llm_chat_large"
    },
    "chat-small": {
      "aliases": [
        "gpt-4o-mini"
      ],
      "endpoints": [
        "chat",
        "completions"
      ],
      "engine": "command",
      "id": "chat-small",
      "paths": {
        "chat": "/v1/chat/completions",
        "completions": "/v1/completions"
      },
      "upstream": "llm_chat_small"
    },
    "gpt-4o-mini": {
      "aliases": [
        "gpt-4o-mini"
      ],
      "endpoints": [
        "chat",
        "completions"
      ],
      "engine": "command",
      "id": "chat-small",
      "paths": {
        "chat": "/v1/chat/completions",
        "completions": "/v1/completions"
      },
      "upstream": "llm_chat_small"
    },
    "text-embedding-3-small": {
      "aliases": [
        "text-embedding-3-small"
      ],
      "endpoints": [
        "embeddings"
      ],
      "engine": "infinity",
      "id": "all-minilm-l6-v2",
      "paths": {
        "embeddings": "/embeddings"
      },
      "upstream": "llm_all_minilm_l6_v2"
    }
  },
  "serviceUpstreams": [],
  "services": {},
  "upstreams": [
    {
      "model": "all-minilm-l6-v2",
      "name": "llm_all_minilm_l6_v2",
      "peers": [
        {
          "address": "10.89.0.12:8103",
          "backup": false,
          "weight": 1
        }
      ],
      "servers": [
        "10.89.0.12:8103"
      ]
    },
    {
      "model": "chat-large",
      "name": "llm_chat_large",
      "peers": [
        {
          "address": "10.89.0.11:8102",
          "backup": false,
          "weight": 1
        }
      ],
      "servers": [
        "10.89.0.11:8102"
      ]
    },
    {
      "model": "chat-small",
      "name": "llm_chat_small",
      "peers": [
        {
          "address": "10.89.0.11:8101",
          "backup": false,
          "weight": 1
        },
        {
          "address": "10.89.0.12:8101",
          "backup": false,
          "weight": 1
        }
      ],
      "servers": [
        "10.89.0.11:8101",
        "10.89.0.12:8101"
      ]
    }
  ]
};
