// njs for deploy/nginx/nginx.conf: carry the model from the JSON body to the sidecar.
//
// Why this is needed: auth_request runs in the access phase, before NGINX reads a request
// body, and its subrequest never carries one. So every call first lands in a js_content
// handler (readBodyThenAuthorize): for js_content NGINX reads the whole body into memory
// (client_body_in_single_buffer, client_body_buffer_size >= client_max_body_size), then
// the handler redirects the call to the named location @llm. There the body is in memory
// when `set $sidecar_model $sidecar_body_model` evaluates model() below (rewrite phase),
// before auth_request sends the model to the sidecar as X-Model. proxy_pass in @llm then
// forwards the same, already read, body to the upstream.
//
// Works with njs 0.7 (Debian 12) and later; ES5 only.

// A JSON string (keys included) then, when it is a key, its colon; or a bracket.
var TOKEN = /"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?|[{}\[\]]/g;
var CONTROL = /[\u0000-\u001f\u007f]/g;
var MAX_MODEL = 256;

function readBodyThenAuthorize(r) {
    r.internalRedirect('@llm');
}

// The model the JSON body names, sent to the sidecar as X-Model: a model NGINX vouches
// for (the sidecar trusts this NGINX). '' sends no X-Model, and the sidecar sees a call
// that names no model (a key with a model whitelist refuses it on a write call).
// Never a guess: a body this cannot read for sure gives ''. Never the client's own
// X-Model header either: it is not what the upstream reads. The sidecar still reads a
// model in the path itself (it beats X-Model).
function model(r) {
    var body;
    try {
        body = r.requestText;
    } catch (e) {
        return '';   // the body went to a temporary file (above client_body_buffer_size)
    }
    return body ? headerSafe(fromBody(body)) : '';
}

function fromBody(body) {
    var doc;
    try {
        doc = JSON.parse(body);
    } catch (e) {
        return '';   // not JSON to a strict parser (NaN, cut off, form data...)
    }
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc) ||
            typeof doc.model !== 'string' || doc.model.length > MAX_MODEL) {
        return '';
    }
    // JSON.parse keeps the last of repeated keys, some upstream parsers the first: a body
    // that may repeat "model" (twice in the text, or spelled with \u006X escapes) is
    // scanned for its top-level keys.
    var first = body.indexOf('"model"');
    if ((body.indexOf('"model"', first + 1) >= 0 || body.indexOf('\\u006') >= 0) &&
            topLevelModels(body) !== 1) {
        return '';
    }
    return doc.model;
}

// How many top-level keys of a valid JSON object text decode to "model".
function topLevelModels(text) {
    var depth = 0, count = 0, m, c;
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(text)) !== null) {
        c = m[0].charAt(0);
        if (c === '"') {
            if (depth === 1 && m[1] &&
                    JSON.parse(m[0].slice(0, m[0].length - m[1].length)) === 'model') {
                count++;
            }
        } else if (c === '{' || c === '[') {
            depth++;
        } else {
            depth--;
        }
    }
    return count;
}

// A header value cannot hold control characters (a newline would inject a header into
// the auth request): escape them, so the value still differs from every whitelisted name.
function headerSafe(value) {
    return value.replace(CONTROL, function (c) {
        return '%' + ('0' + c.charCodeAt(0).toString(16).toUpperCase()).slice(-2);
    });
}

export default {readBodyThenAuthorize, model};
