/*
 * multipart/form-data, read where nginx holds the body: one named part's value,
 * found by searching the body's bytes for the boundary (Buffer.indexOf), so a
 * 20 MB image part is skipped, never turned into a JavaScript string. Only the
 * part's headers and the value asked for become strings.
 *
 * The rule: the parts are read in order from the first delimiter line, and
 * the first part of the name asked for counts; what follows it is not read
 * (clients send their fields before their files, so an upload is never
 * searched). A body that ends before the part's end, a part without a blank
 * line after its headers, or a wanted part larger than `limit` bytes is an
 * error, never a guess. Why the first and not the last (which FastAPI's form
 * parser takes): roles/gateway/README.md, "Multipart bodies".
 *
 * Runs on njs 0.7.9 (Debian 12) and 0.8 alike: Buffer, indexOf, slice, toString.
 * Unit-tested through a real nginx (tests/nginx/test_multipart.py).
 */

var CR = 13, LF = 10, DASH = 45, SPACE = 32, TAB = 9;
// A part's header block beyond this is not a form field's: refuse rather than search on.
var HEADERS_MAX = 8192;
// RFC 2046: 1 to 70 characters, space allowed but not last.
var BOUNDARY_RE = /^[0-9A-Za-z'()+_,\-.\/:=? ]{0,69}[0-9A-Za-z'()+_,\-.\/:=?]$/;
var PARAM_RE = /;\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))/g;

function MultipartError(code, message) {
    this.code = code;
    this.message = message;
}

/* The parameters of a header value after its first ";" as {lower-case name: value}. */
function params(text) {
    var result = {}, m;
    PARAM_RE.lastIndex = 0;
    while ((m = PARAM_RE.exec(text)) !== null) {
        result[m[1].toLowerCase()] = m[2] !== undefined ? m[2].replace(/\\(.)/g, '$1') : m[3];
    }
    return result;
}

/* The boundary of a multipart/form-data Content-Type, or null when it is none. */
function boundary(contentType) {
    var m = /^\s*multipart\/form-data\s*(;.*)?$/i.exec(contentType || ''), value;
    if (m === null || m[1] === undefined) {
        return null;
    }
    value = params(m[1]).boundary;
    return value !== undefined && BOUNDARY_RE.test(value) ? value : null;
}

/*
 * The next delimiter line at or after `from`: {end, at}, where `end` is where the
 * content before it ends (its CRLF or LF) and `at` where "--boundary" starts; or null.
 * A "--boundary" not at a line's start, or followed by other text, is content.
 */
function nextDelimiter(body, delim, from, to) {
    // Line ends, found by byte (njs searches one byte about twice as fast as a string),
    // each checked for the delimiter after it.
    var n = delim.length, k = body.indexOf(LF, from), at, after, i;
    while (k !== -1 && k + 1 + n <= to) {
        at = k + 1;
        if (body[at] === DASH && body[at + 1] === DASH) {
            for (i = 2; i < n && body[at + i] === delim[i]; i++) {
                // compare
            }
            after = body[at + n];
            if (i === n && (after === DASH || after === CR || after === LF || after === SPACE || after === TAB ||
                            after === undefined)) {
                return {end: k > from && body[k - 1] === CR ? k - 1 : k, at: at};
            }
        }
        k = body.indexOf(LF, at);
    }
    return null;
}

/* After the delimiter at i: the index where the part's headers start, or -1 at the closing one. */
function afterDelimiter(body, i, delimLength) {
    var j = i + delimLength;
    if (body[j] === DASH && body[j + 1] === DASH) {
        return -1;
    }
    while (body[j] === SPACE || body[j] === TAB) {
        j++;
    }
    if (body[j] === CR && body[j + 1] === LF) {
        return j + 2;
    }
    if (body[j] === LF) {
        return j + 1;
    }
    throw new MultipartError('invalid_body', 'a boundary line is not followed by a line end');
}

/* The part's headers from j: {name, start} with `start` where its content begins. */
function partHeaders(body, j) {
    var window, crlf, lf, end, start, lines, i, m, disposition = null;
    if (body[j] === CR && body[j + 1] === LF) {
        end = j;
        start = j + 2;
    } else if (body[j] === LF) {
        end = j;
        start = j + 1;
    } else {
        window = body.slice(j, Math.min(body.length, j + HEADERS_MAX));
        crlf = window.indexOf('\r\n\r\n');
        lf = window.indexOf('\n\n');
        if (crlf === -1 && lf === -1) {
            throw new MultipartError('invalid_body', j + HEADERS_MAX < body.length ?
                                     'a part\'s headers are longer than ' + HEADERS_MAX + ' bytes' :
                                     'the body ends inside a part\'s headers');
        }
        if (crlf !== -1 && (lf === -1 || crlf < lf)) {
            end = j + crlf;
            start = end + 4;
        } else {
            end = j + lf;
            start = end + 2;
        }
    }
    // Folded lines (a leading space or tab) continue the header before them.
    lines = body.toString('utf8', j, end).replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/);
    for (i = 0; i < lines.length; i++) {
        m = /^content-disposition[ \t]*:[ \t]*form-data[ \t]*(;.*)?$/i.exec(lines[i]);
        if (m !== null) {
            disposition = params(m[1] || '');
        }
    }
    return {name: disposition === null ? undefined : disposition.name, start: start};
}

/*
 * The value of the first part named `name`, as a Buffer, or null when no part has
 * that name. Throws MultipartError: code "invalid_body" for a body that is not
 * multipart as its boundary says, "part_too_large" for a part of that name larger
 * than `limit` bytes.
 */
function findPart(body, boundaryText, name, limit) {
    var delim = Buffer.from('--' + boundaryText), i, j, part, next;
    if (body.length >= delim.length && body.slice(0, delim.length).equals(delim)) {
        i = 0;
    } else {
        // A preamble before the first delimiter is allowed, and ignored.
        next = nextDelimiter(body, delim, 0, body.length);
        if (next === null) {
            throw new MultipartError('invalid_body', 'the body holds no boundary line of its Content-Type');
        }
        i = next.at;
    }
    for (;;) {
        j = afterDelimiter(body, i, delim.length);
        if (j === -1) {
            return null;
        }
        part = partHeaders(body, j);
        if (part.name === name) {
            // Only the first limit bytes are searched: a bigger part of this name is refused.
            next = nextDelimiter(body, delim, part.start, Math.min(body.length, part.start + limit + delim.length + 2));
            if (next === null) {
                throw part.start + limit + 2 < body.length ?
                    new MultipartError('part_too_large', 'the "' + name + '" part is larger than ' + limit + ' bytes') :
                    new MultipartError('invalid_body', 'the body ends inside the "' + name + '" part');
            }
            if (next.end - part.start > limit) {
                throw new MultipartError('part_too_large', 'the "' + name + '" part is larger than ' + limit + ' bytes');
            }
            return body.slice(part.start, next.end);
        } else {
            next = nextDelimiter(body, delim, part.start, body.length);
            if (next === null) {
                throw new MultipartError('invalid_body', 'the body ends before its closing boundary');
            }
        }
        i = next.at;
    }
}

export default {boundary, findPart, MultipartError};
