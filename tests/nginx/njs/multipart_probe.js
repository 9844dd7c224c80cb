/*
 * Test harness for roles/gateway/files/multipart.js (tests/nginx/test_multipart.py):
 * POST /parse?name=<part>&limit=<bytes> answers what the reader found in the body,
 * as JSON: {boundary, found, value, length} or {boundary, error, message}.
 */
import multipart from 'multipart.js';

function parse(r) {
    var bound = multipart.boundary(r.headersIn['Content-Type']), part, out = {boundary: bound};
    if (bound !== null) {
        try {
            part = multipart.findPart(r.requestBuffer || Buffer.from(''), bound, r.args.name,
                                      Number(r.args.limit || 65536));
            out.found = part !== null;
            if (part !== null) {
                out.value = part.toString('utf8');
                out.length = part.length;
            }
        } catch (e) {
            if (!(e instanceof multipart.MultipartError)) {
                throw e;
            }
            out.error = e.code;
            out.message = e.message;
        }
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, JSON.stringify(out));
}

export default {parse};
