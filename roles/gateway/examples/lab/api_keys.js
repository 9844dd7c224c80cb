// Ansible managed (roles/gateway/examples/lab: the lab registry rendered)
// What the njs router needs of the client keys (llm_api_keys): each key's models
// and rate, by id. No key and no hash is in this file; nginx checks the keys.
export default {
  "addressRatePerMinute": 6000,
  "keys": {
    "lab": {
      "models": null,
      "rate_per_minute": 600
    }
  },
  "required": true
};
