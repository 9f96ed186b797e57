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

var MODEL_IN_TEXT = /"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"/;
var CONTROL = /[\u0000-\u001f\u007f]/g;
var MAX_MODEL = 256;

function readBodyThenAuthorize(r) {
    r.internalRedirect('@llm');
}

// The model the call names, as the sidecar's own rule: the JSON body's "model", else the
// client's X-Model header ('' for none; the sidecar also reads a model in the path).
function model(r) {
    var body;
    try {
        body = r.requestText;
    } catch (e) {
        // The body went to a temporary file (larger than client_body_buffer_size). Do not
        // fall back to the client's X-Model header, which the body may contradict: no
        // model makes the sidecar refuse a write call on a key with a model whitelist.
        return '';
    }
    if (body) {
        var found = fromBody(body);
        if (found !== null) {
            return headerSafe(found);
        }
    }
    return headerSafe(r.headersIn['X-Model'] || '');
}

function fromBody(body) {
    var doc;
    try {
        doc = JSON.parse(body);
    } catch (e) {
        // Not valid JSON: read a top-level-looking "model" from the text, as the sidecar
        // does with a truncated body.
        var match = MODEL_IN_TEXT.exec(body);
        if (!match) {
            return null;
        }
        try {
            return JSON.parse('"' + match[1] + '"');
        } catch (e2) {
            return null;
        }
    }
    if (doc !== null && typeof doc === 'object' && typeof doc.model === 'string' && doc.model) {
        return doc.model;
    }
    return null;
}

// A header value cannot hold control characters (a newline would inject a header into
// the auth request): escape them, so the value still differs from every whitelisted name.
function headerSafe(value) {
    value = value.slice(0, MAX_MODEL);
    return value.replace(CONTROL, function (c) {
        return '%' + ('0' + c.charCodeAt(0).toString(16).toUpperCase()).slice(-2);
    });
}

export default {readBodyThenAuthorize, model};
