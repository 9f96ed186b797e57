// njs for deploy/nginx/nginx.conf: settle a streamed (SSE) call with its final usage.
//
// watch() is the js_body_filter of @llm: it passes every chunk on first (the client never
// waits on it), then reads the SSE `data:` lines of a text/event-stream answer for
//   - the final usage: OpenAI Chat Completions' last chunk `usage` (the client asked with
//     stream_options.include_usage), OpenAI Responses' response.completed
//     `response.usage`, Anthropic's message_start `message.usage` then message_delta
//     `usage` (the final output_tokens);
//   - the text delivered so far (delta content, tool-call arguments), for a cut stream.
// It keeps a short summary in $sidecar_stream (js_var). NGINX then runs post_action
// @sidecar_settle when the call ends, however it ends (a normal end, the upstream cutting
// the stream, the client going away): report() turns the summary into the /settle body.
//
// Why post_action and not ngx.fetch: njs refuses asynchronous calls inside a body filter
// ("async operation inside body filter"), and the request, with its njs VM, is freed
// right after the last chunk. post_action is a proxy_pass to the same `sidecar` upstream
// block: no resolver, pooled connections, the client's answer already sent.
//
// The settlement rule (docs/budgets.md "Streaming"):
//   - final usage seen: reported as it is (the model the request body named, as the
//     sidecar priced the reservation; else the model the stream named);
//   - cut off after the prompt tokens were seen (Anthropic's message_start): those, and
//     the output tokens delivered: the largest of the upstream's running count, the
//     delta events, and the delta text's UTF-8 bytes / 2 (errs toward more tokens);
//   - nothing countable (an OpenAI stream never names its prompt tokens before its last
//     chunk): no report; the reservation ends by expired_reservation.
//
// Works with njs 0.7 (Debian 12) and later; ES5 only. Each request has its own njs VM,
// so `state` below belongs to one call.

var MAX_LINE = 1048576;      // an SSE line longer than this is skipped, not buffered
var USAGE = ['prompt_tokens', 'completion_tokens', 'input_tokens', 'output_tokens',
             'cache_read_input_tokens', 'cache_creation_input_tokens'];
var DETAILS = ['prompt_tokens_details', 'input_tokens_details'];
var state = null;

function watch(r, data, flags) {
    if (state === null) {
        state = begin(r);
    }
    if (state === false || !state.added) {
        r.sendBuffer(data, flags);                     // first: the client never waits
        if (state && data.length) {
            lines(state, data, null);
            keep(r, state);
        }
        return;
    }
    // The gateway asked for the usage chunk (withUsage): the client gets every line but
    // that chunk's, whole lines only (a partial line waits for its end, as an SSE client
    // must anyway).
    var kept = [];
    if (data.length) {
        lines(state, data, kept);
        keep(r, state);
    }
    if (flags.last && state.tail.length) {
        kept.push(state.tail);
        state.tail = Buffer.alloc(0);
    }
    r.sendBuffer(kept.length ? Buffer.concat(kept) : Buffer.alloc(0), flags);
}

function begin(r) {
    var type = r.headersOut['Content-Type'] || '';
    if (r.status !== 200 || !r.variables.sidecar_reservation_id ||
            type.toLowerCase().indexOf('text/event-stream') !== 0) {
        return false;        // not a stream that a report could settle
    }
    return {tail: Buffer.alloc(0), usage: {}, seen: false, final: false, model: '',
            bytes: 0, deltas: 0, added: r.variables.sidecar_usage_added === '1'};
}

function keep(r, st) {
    r.variables.sidecar_stream = JSON.stringify({
        usage: st.usage, seen: st.seen, final: st.final, model: st.model,
        bytes: st.bytes, deltas: st.deltas});
}

// Reads the complete lines of the stream so far; with `kept`, collects the bytes the
// client gets (every line but the added usage chunk's).
function lines(st, data, kept) {
    var buf = st.tail.length ? Buffer.concat([st.tail, data]) : data;
    var start = 0, end;
    while ((end = buf.indexOf(10, start)) >= 0) {
        if (!event(st, buf.slice(start, end).toString('utf8')) && kept) {
            kept.push(buf.slice(start, end + 1));
        }
        start = end + 1;
    }
    st.tail = buf.slice(start);
    if (st.tail.length > MAX_LINE) {       // not an SSE line we read: passed on as it is
        if (kept) {
            kept.push(st.tail);
        }
        st.tail = Buffer.alloc(0);
    }
}

function event(st, line) {
    if (line.slice(0, 5) !== 'data:') {
        return false;
    }
    var ev;
    try {
        ev = JSON.parse(line.slice(5));
    } catch (e) {
        return false;                 // [DONE], or not JSON
    }
    if (ev === null || typeof ev !== 'object') {
        return false;
    }
    var holder = ev.type === 'message_start' ? ev.message :
        ev.type === 'response.completed' ? ev.response : ev;
    if (!st.model && holder && typeof holder.model === 'string') {
        st.model = holder.model.slice(0, 256);
    }
    if (holder && holder.usage && typeof holder.usage === 'object') {
        merge(st.usage, holder.usage);
        st.seen = true;
        if (ev.type === 'message_delta' || ev.type === 'response.completed' ||
                typeof holder.usage.completion_tokens === 'number') {
            st.final = true;
        }
    }
    delivered(st, ev);
    // OpenAI's usage chunk: no choices, only the usage (withUsage drops it if it asked)
    return Array.isArray(ev.choices) && ev.choices.length === 0 && !!ev.usage;
}

function merge(into, usage) {
    var i, name;
    for (i = 0; i < USAGE.length; i++) {
        if (typeof usage[USAGE[i]] === 'number') {
            into[USAGE[i]] = usage[USAGE[i]];
        }
    }
    for (i = 0; i < DETAILS.length; i++) {
        name = DETAILS[i];
        if (usage[name] && typeof usage[name].cached_tokens === 'number') {
            into[name] = {cached_tokens: usage[name].cached_tokens};
        }
    }
}

// The text this event delivered to the client, counted for a stream cut off later.
function delivered(st, ev) {
    var texts = [], i, d, calls, j;
    if (Array.isArray(ev.choices)) {                       // OpenAI Chat Completions
        for (i = 0; i < ev.choices.length; i++) {
            d = ev.choices[i] && ev.choices[i].delta;
            if (!d) {
                continue;
            }
            texts.push(d.content, d.reasoning_content, d.refusal);
            calls = Array.isArray(d.tool_calls) ? d.tool_calls : [];
            for (j = 0; j < calls.length; j++) {
                texts.push(calls[j] && calls[j]['function'] && calls[j]['function'].arguments);
            }
        }
    } else if (ev.type === 'content_block_delta' && ev.delta) {   // Anthropic
        texts.push(ev.delta.text, ev.delta.partial_json, ev.delta.thinking);
    } else if (typeof ev.delta === 'string') {                    // OpenAI Responses
        texts.push(ev.delta);
    }
    for (i = 0; i < texts.length; i++) {
        if (typeof texts[i] === 'string' && texts[i].length) {
            st.bytes += Buffer.byteLength(texts[i]);
            st.deltas++;
        }
    }
}

// The /settle body for this call (post_action @sidecar_settle), or '' for no report.
function report(r) {
    var v = r.variables, st;
    if (!v.sidecar_stream || !v.sidecar_reservation_id || !v.sidecar_key_id ||
            !process.env.SIDECAR_SETTLEMENT_TOKEN) {
        return '';
    }
    try {
        st = JSON.parse(v.sidecar_stream);
    } catch (e) {
        return '';
    }
    var usage = st.usage;
    if (!st.final) {
        if (typeof usage.input_tokens !== 'number') {
            return '';   // no prompt count: left to expired_reservation
        }
        usage.output_tokens = Math.max(usage.output_tokens || 0, st.deltas,
                                       Math.ceil(st.bytes / 2));
    }
    return JSON.stringify({reservation_id: v.sidecar_reservation_id,
                           key_id: v.sidecar_key_id,
                           model: v.sidecar_model || st.model, usage: usage});
}

// The body for the upstream when the gateway adds stream_options.include_usage, else ''
// (the client's body goes as it is, $request_body). Only a streamed OpenAI (legacy)
// Completions or Chat Completions call whose JSON body has, for sure, one top-level
// "stream": true and no "stream_options"; the text is kept byte for byte, the member
// is inserted after the opening brace. $sidecar_usage_added tells watch() to drop the
// usage chunk the client did not ask for.
function withUsage(r) {
    var body, doc;
    if (r.variables.sidecar_ask_for_usage !== 'on' || r.method !== 'POST' ||
            !/\/(chat\/)?completions$/.test(r.uri)) {
        return '';
    }
    try {
        body = r.requestText;
        // most calls are not streamed: no second parse of their body (model() did one)
        doc = body && body.indexOf('"stream"') >= 0 ? JSON.parse(body) : null;
    } catch (e) {
        return '';
    }
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc) ||
            doc.stream !== true || 'stream_options' in doc ||
            Buffer.byteLength(body) !== r.requestBuffer.length ||
            topLevel(body, 'stream') !== 1 || topLevel(body, 'stream_options') !== 0) {
        return '';
    }
    var at = body.indexOf('{') + 1;
    r.variables.sidecar_usage_added = '1';
    return body.slice(0, at) + '"stream_options":{"include_usage":true},' + body.slice(at);
}

// How many top-level keys of a valid JSON object text decode to `name`.
var TOKEN = /"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?|[{}\[\]]/g;
function topLevel(text, name) {
    var depth = 0, count = 0, m, c;
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(text)) !== null) {
        c = m[0].charAt(0);
        if (c === '"') {
            if (depth === 1 && m[1] &&
                    JSON.parse(m[0].slice(0, m[0].length - m[1].length)) === name) {
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

function auth(r) {
    return 'Bearer ' + (process.env.SIDECAR_SETTLEMENT_TOKEN || '');
}

export default {watch, report, auth, withUsage};
