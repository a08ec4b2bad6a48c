// Request checks of the Kandinsky gateway (njs, loaded by the rendered nginx.conf).
//
// Triton allocates a JSON tensor input at its *declared* shape before it looks at the data, so a tiny
// request declaring a huge shape can abort the server or kill a python-backend stub. These handlers read
// the JSON part of a request and refuse, with HTTP 400 and {"error": "..."}, what Triton should not see:
//   infer:    every input that carries JSON "data" must declare a shape of non-negative integers whose
//             element count equals the number of (flattened) data values and is at most the configured
//             limit; inputs sent as binary data ("binary_data_size") are left to Triton, which checks
//             their byte size first; shared-memory inputs/outputs are refused; compressed bodies too.
//   generate: the body must be a JSON object whose fields are inputs of the model, each of the input's
//             JSON type (from the served repository's config.pbtxt), plus an optional "parameters"
//             object of scalars (Triton's generate extension).
// Accepted requests continue, unchanged, to a proxy location (internal redirect), so responses
// (server-sent events included) stream as they would without the gateway.
//
// The limits and the type table come from kandinsky_gateway_config.js, written at gateway start.

import config from 'kandinsky_gateway_config.js';

function refuse(r, status, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({error: message}) + '\n');
}

// The JSON text of a request: the whole body, or for an infer request with binary tensor data the
// first Inference-Header-Content-Length bytes. `limit` (bytes) bounds what will be parsed.
function bodyText(r, headerOnly, limit) {
    var body = r.requestBuffer;
    if (body === undefined || body === null) {
        return {text: ''};
    }
    var n = body.length;
    var length = r.headersIn['Inference-Header-Content-Length'];
    if (headerOnly && length !== undefined) {
        n = Number(length);
        if (!Number.isInteger(n) || n < 0 || n > body.length) {
            return {error: 'Inference-Header-Content-Length is ' + length + '; the body has ' + body.length + ' bytes'};
        }
    }
    if (limit !== undefined && n > limit) {
        return {error: 'the JSON part of the request is ' + n + ' bytes; at most ' + limit
            + ' (json_max_text_bytes): send large tensors as binary data'};
    }
    return {text: n === body.length ? body.toString() : body.slice(0, n).toString()};
}

function parseObject(r, text) {
    var value;
    try {
        value = JSON.parse(text);
    } catch (e) {
        refuse(r, 400, 'the request body is not valid JSON: ' + e.message);
        return null;
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        refuse(r, 400, 'the request body must be a JSON object');
        return null;
    }
    return value;
}

function compressed(r) {
    var encoding = r.headersIn['Content-Encoding'];
    return encoding !== undefined && encoding.toLowerCase() !== 'identity';
}

// Product of a declared shape, or -1 when it is not a list of non-negative integers.
function declaredElements(shape) {
    if (!Array.isArray(shape)) {
        return -1;
    }
    var count = 1;
    for (var i = 0; i < shape.length; i++) {
        var d = shape[i];
        if (typeof d !== 'number' || !Number.isInteger(d) || d < 0) {
            return -1;
        }
        count *= d;
    }
    return count;
}

// Number of leaf values in (possibly nested) JSON data; stops counting above `limit`.
function dataElements(data, limit) {
    if (!Array.isArray(data)) {
        return 1;
    }
    var count = 0;
    var stack = [data];
    while (stack.length > 0) {
        var list = stack.pop();
        for (var i = 0; i < list.length; i++) {
            if (Array.isArray(list[i])) {
                stack.push(list[i]);
            } else {
                count++;
            }
        }
        if (count > limit) {
            return count;
        }
    }
    return count;
}

function usesSharedMemory(tensor) {
    var p = tensor.parameters;
    return typeof p === 'object' && p !== null && p.shared_memory_region !== undefined;
}

function checkInferRequest(request) {
    var limit = config.json_max_elements;
    var inputs = request.inputs;
    if (!Array.isArray(inputs)) {
        return "the request must carry an 'inputs' list";
    }
    for (var i = 0; i < inputs.length; i++) {
        var input = inputs[i];
        if (typeof input !== 'object' || input === null || Array.isArray(input)) {
            return 'inputs[' + i + '] must be a JSON object';
        }
        var name = String(input.name);
        if (usesSharedMemory(input)) {
            return "input '" + name + "': shared-memory inputs are not accepted through the gateway";
        }
        var parameters = input.parameters;
        if (typeof parameters === 'object' && parameters !== null && parameters.binary_data_size !== undefined) {
            continue;  // binary tensor data: Triton checks its byte size against the shape first
        }
        if (input.data === undefined) {
            return "input '" + name + "' carries neither JSON data nor binary_data_size";
        }
        var declared = declaredElements(input.shape);
        if (declared < 0) {
            return "input '" + name + "' shape must be a list of non-negative integers, not " + JSON.stringify(input.shape);
        }
        if (declared > limit) {
            return "input '" + name + "' declares shape " + JSON.stringify(input.shape) + ' (' + declared
                + ' elements); at most ' + limit + ' elements may be sent as JSON data (json_max_elements)';
        }
        var carried = dataElements(input.data, limit);
        if (carried !== declared) {
            return "input '" + name + "' declares shape " + JSON.stringify(input.shape) + ' (' + declared
                + ' elements) but carries ' + (carried > limit ? 'more than ' + limit : carried) + ' data values';
        }
    }
    var outputs = request.outputs;
    if (Array.isArray(outputs)) {
        for (var j = 0; j < outputs.length; j++) {
            if (typeof outputs[j] === 'object' && outputs[j] !== null && usesSharedMemory(outputs[j])) {
                return "output '" + String(outputs[j].name) + "': shared-memory outputs are not accepted through the gateway";
            }
        }
    }
    return null;
}

function infer(r) {
    if (compressed(r)) {
        refuse(r, 400, 'compressed request bodies (Content-Encoding) are not accepted by the gateway; send them uncompressed');
        return;
    }
    var body = bodyText(r, true, config.json_max_text_bytes);
    if (body.error) {
        refuse(r, 400, body.error);
        return;
    }
    var request = parseObject(r, body.text);
    if (request === null) {
        return;
    }
    var problem = checkInferRequest(request);
    if (problem !== null) {
        refuse(r, 400, problem);
        return;
    }
    r.internalRedirect('@triton');
}

// "a string", "an integer", "a list", ...: what a JSON value is, for messages.
function jsonKind(value) {
    var kind = typeof value;
    if (value === null) {
        kind = 'null';
    } else if (Array.isArray(value)) {
        kind = 'list';
    } else if (kind === 'number') {
        kind = Number.isInteger(value) ? 'integer' : 'number';
    }
    return (kind === 'integer' ? 'an ' : 'a ') + kind;
}

function fits(kind, value) {
    if (kind === 'integer') {
        return typeof value === 'number' && Number.isInteger(value);
    }
    return typeof value === kind;  // 'string', 'number', 'boolean'
}

function checkField(model, name, field, value) {
    if (fits(field.kind, value)) {
        return null;
    }
    if (field.list && Array.isArray(value)) {
        for (var i = 0; i < value.length; i++) {
            if (!fits(field.kind, value[i])) {
                return "field '" + name + "' must be a list of " + field.kind + 's (input of model \'' + model + "' of "
                    + field.triton + '); item ' + i + ' is ' + jsonKind(value[i]);
            }
        }
        return null;
    }
    return "field '" + name + "' must be " + (field.kind === 'integer' ? 'an ' : 'a ') + field.kind + (field.list ? ' or a list of ' + field.kind + 's' : '')
        + " (input of model '" + model + "' of " + field.triton + '); got ' + jsonKind(value);
}

function checkParameters(value) {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        return "field 'parameters' must be a JSON object";
    }
    var keys = Object.keys(value);
    for (var i = 0; i < keys.length; i++) {
        var kind = typeof value[keys[i]];
        if (kind !== 'string' && kind !== 'number' && kind !== 'boolean') {
            return "parameter '" + keys[i] + "' must be a string, a number or a boolean";
        }
    }
    return null;
}

function generate(r) {
    var model = r.variables.kandinsky_model;
    var fields = config.generate[model];
    if (fields === undefined) {
        refuse(r, 404, "model '" + model + "' is not in the served repository");
        return;
    }
    var request = parseObject(r, bodyText(r, false, undefined).text);
    if (request === null) {
        return;
    }
    var names = Object.keys(request);
    for (var i = 0; i < names.length; i++) {
        var name = names[i];
        var problem = null;
        if (name === 'parameters' && fields[name] === undefined) {
            problem = checkParameters(request[name]);
        } else if (fields[name] === undefined) {
            var valid = Object.keys(fields).concat(['parameters']);
            problem = "field '" + name + "' is not an input of model '" + model + "'; valid fields: " + valid.join(', ');
        } else {
            problem = checkField(model, name, fields[name], request[name]);
        }
        if (problem !== null) {
            refuse(r, 400, problem);
            return;
        }
    }
    r.internalRedirect(r.variables.kandinsky_stream ? '@triton_stream' : '@triton');
}

export default {infer, generate};
