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
    r.sendBuffer(data, flags);
    if (state === false) {
        return;
    }
    if (state === null) {
        var type = r.headersOut['Content-Type'] || '';
        if (r.status !== 200 || !r.variables.sidecar_reservation_id ||
                type.toLowerCase().indexOf('text/event-stream') !== 0) {
            state = false;   // not a stream that a report could settle
            return;
        }
        state = {tail: Buffer.alloc(0), usage: {}, seen: false, final: false, model: '',
                 bytes: 0, deltas: 0};
    }
    if (data.length) {
        lines(state, data);
        r.variables.sidecar_stream = JSON.stringify({
            usage: state.usage, seen: state.seen, final: state.final, model: state.model,
            bytes: state.bytes, deltas: state.deltas});
    }
}

function lines(st, data) {
    var buf = st.tail.length ? Buffer.concat([st.tail, data]) : data;
    var start = 0, end;
    while ((end = buf.indexOf(10, start)) >= 0) {
        event(st, buf.slice(start, end).toString('utf8'));
        start = end + 1;
    }
    st.tail = buf.length - start > MAX_LINE ? Buffer.alloc(0) : buf.slice(start);
}

function event(st, line) {
    if (line.slice(0, 5) !== 'data:') {
        return;
    }
    var ev;
    try {
        ev = JSON.parse(line.slice(5));
    } catch (e) {
        return;                       // [DONE], or not JSON
    }
    if (ev === null || typeof ev !== 'object') {
        return;
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

function auth(r) {
    return 'Bearer ' + (process.env.SIDECAR_SETTLEMENT_TOKEN || '');
}

export default {watch, report, auth};
