/*
 * The client's API key: "Authorization: Bearer <key>" hashed with SHA-256 and
 * looked up in api_keys.js, which the gateway role generates from llm_api_keys
 * and which holds hashes, ids and rules, never a key.
 *
 * keyId() is the js_set behind $llm_key_id: nginx asks it in the rewrite phase
 * of every API request, before any limit counts it, and keeps the answer for
 * the request. This module is kept small on purpose: njs sets up the modules of
 * a location for each request that runs JavaScript there, and nginx routes most
 * requests without the router. Runs on njs 0.7.9.
 */
import apiKeys from 'api_keys.js';

var crypto = require('crypto');

var KEY_BY_ID = {};
Object.keys(apiKeys.keys).forEach(function (hash) {
    KEY_BY_ID[apiKeys.keys[hash].id] = apiKeys.keys[hash];
});
// RFC 6750's b64token, at most as long as a key the role accepts.
var BEARER = /^Bearer +([A-Za-z0-9._~+\/-]{1,256}=*) *$/i;

/* {key} when the request carries a known, unexpired key, else {reason}. Never the key itself. */
function checkKey(r) {
    var header = r.headersIn.Authorization, match, key;

    if (header === undefined || header === '') {
        return {reason: 'missing'};
    }
    match = BEARER.exec(header);
    if (!match) {
        return {reason: 'malformed'};
    }
    key = apiKeys.keys[crypto.createHash('sha256').update(match[1]).digest('hex')];
    if (!key) {
        return {reason: 'unknown'};
    }
    if (key.expires !== null && Date.now() / 1000 >= key.expires) {
        return {reason: 'expired'};
    }
    return {key: key};
}

/* js_set $llm_key_id: the id of the request's valid key, or empty. */
function keyId(r) {
    var checked = checkKey(r);
    return checked.key ? checked.key.id : '';
}

function keyById(id) {
    return KEY_BY_ID[id];
}

/* May the request's key use this model (its canonical name)? Every model when keys are off. */
function permitted(r, model) {
    var key;
    if (!apiKeys.required) {
        return true;
    }
    key = KEY_BY_ID[r.variables.llm_key_id];
    return key !== undefined && (key.models === null || key.models.indexOf(model) !== -1);
}

export default {keyId, checkKey, keyById, permitted, addressRatePerMinute: apiKeys.addressRatePerMinute};
