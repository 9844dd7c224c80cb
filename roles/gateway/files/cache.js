/*
 * The response cache's key needs the request body, and nginx's cache files keep
 * their key on one line of text: the key holds the body's SHA-256, never the body
 * (gateway.conf, "Response cache"). Loaded for every request of a gateway that
 * caches, so it builds nothing when it loads.
 */
var crypto = require('crypto');

/* js_set $llm_body_digest: the request body's SHA-256 (hex), empty without a body. */
function bodyDigest(r) {
    var body = r.requestBuffer;
    return body && body.length ? crypto.createHash('sha256').update(body).digest('hex') : '';
}

export default {bodyDigest};
