/*
 * The client's API key, checked on every API request: "Authorization: Bearer <key>"
 * hashed with SHA-256 here, the hash looked up in nginx's map of known keys
 * (gateway.conf: $llm_key_hash -> $llm_key_row, generated from llm_api_keys; only
 * hashes are on the gateway), the row's expiry checked here.
 *
 * This module imports nothing and builds nothing when it loads, on purpose: njs
 * 0.7 sets up the modules of a location anew for each request that runs
 * JavaScript there, so whatever a module builds at load time is paid by every
 * request. The tables stay in nginx, where a lookup costs a hash.
 */
var crypto = require('crypto');

// RFC 6750's b64token, at most as long as a key the role accepts.
var BEARER = /^Bearer +([A-Za-z0-9._~+\/-]{1,256}=*) *$/i;
// $llm_key_hash of an Authorization header that is not "Bearer <token>".
var MALFORMED = '-';

/* js_set $llm_key_hash: the key's SHA-256 (hex); empty without a header, "-" for a malformed one. */
function keyHash(r) {
    var header = r.headersIn.Authorization, match;
    if (header === undefined || header === '') {
        return '';
    }
    match = BEARER.exec(header);
    return match ? crypto.createHash('sha256').update(match[1]).digest('hex') : MALFORMED;
}

/* "<id> <expires>" (0: never) -> the id if the key has not expired, else empty. */
function validId(row) {
    var space = row.indexOf(' '), expires;
    if (space === -1) {
        return '';
    }
    expires = Number(row.substring(space + 1));
    return expires && Date.now() / 1000 >= expires ? '' : row.substring(0, space);
}

/* js_set $llm_key_id: the id of the request's valid key, or empty. */
function keyId(r) {
    var row = r.variables.llm_key_row;
    return row ? validId(row) : '';
}

/* Why a request has no valid key: missing, malformed, unknown or expired (never the key). */
function reason(r) {
    var hash = r.variables.llm_key_hash;
    if (!hash) {
        return 'missing';
    }
    if (hash === MALFORMED) {
        return 'malformed';
    }
    return r.variables.llm_key_row ? 'expired' : 'unknown';
}

export default {keyHash, keyId, reason};
