// Ansible managed (roles/gateway/examples/lab: the lab registry rendered)
// Client API keys as SHA-256 hashes, from llm_api_keys; router.js imports it.
// No key is in this file, only what checks one.
export default {
  "addressRatePerMinute": 6000,
  "keys": {
    "f1cbca2f9c8b16414b3f9cedbad0eddbd34d9383ef6bb267ac42aa28f4a320b4": {
      "expires": null,
      "id": "lab",
      "models": null,
      "rate_per_minute": 600
    }
  },
  "required": true
};
