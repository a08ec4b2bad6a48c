// Request checks of the Kandinsky gateway (njs, loaded by the rendered nginx.conf).
//
// Triton's request readers crash on some requests: a JSON tensor is allocated at its *declared* shape
// before its data is counted (std::bad_alloc, SIGABRT), rapidjson recurses into deeply nested JSON
// (SIGSEGV), and a shape whose product overflows int64 (or holds a 0 beside a huge dimension) passes
// Triton's byte-size check and aborts a python-backend stub. So the gateway reads every request body
// before Triton does, exactly as strictly as the most permissive reader behind it, and refuses (HTTP 400
// with {"error": "..."}, gRPC INVALID_ARGUMENT) what it cannot read or what Triton should not see:
//   every JSON body (infer, generate, repository index): valid JSON (njs refuses nesting deeper than 32
//     levels), an object, no key twice in one object (njs keeps the last, Triton's rapidjson the first);
//   infer (HTTP): every input declares a shape of integers >= 1 whose product fits the limit: for JSON
//     "data", json_max_elements values, exactly as many as it carries; for binary data, exactly its
//     binary_data_size at the datatype's item size; the binary parts fill the body exactly;
//   ModelInfer (gRPC, one message): the same rules on the protobuf message (raw_input_contents or typed
//     contents); ModelStreamInfer messages are checked the same way by the stream relay (relay.py);
//   shared-memory inputs and outputs, compressed bodies, unknown datatypes: refused;
//   generate: the fields are inputs of the model, each of the input's JSON type (from the served
//     repository's config.pbtxt), plus an optional "parameters" object of scalars;
//   GET routes: no body.
// A handler that fails for any other reason refuses too (fail closed). Accepted requests continue,
// unchanged, to a proxy location (internal redirect), where they are counted as in flight: only once the
// body has arrived. Responses (server-sent events included) stream as they would without the gateway.
//
// The limits and tables come from kandinsky_gateway_config.js, written at gateway start.

import config from 'kandinsky_gateway_config.js';

// -- replies ---------------------------------------------------------------------------------------------

function refuse(r, status, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({error: message}) + '\n');
}

// gRPC's percent-encoding of grpc-message: printable ASCII except '%' stays.
function grpcMessage(text) {
    var bytes = Buffer.from(text);
    var out = '';
    for (var i = 0; i < bytes.length; i++) {
        var b = bytes[i];
        out += (b >= 0x20 && b <= 0x7e && b !== 0x25) ? String.fromCharCode(b)
            : '%' + (b < 16 ? '0' : '') + b.toString(16).toUpperCase();
    }
    return out;
}

// A trailers-only gRPC error (HTTP/2 headers carry grpc-status; 3: INVALID_ARGUMENT).
function refuseGrpc(r, code, message) {
    r.headersOut['Content-Type'] = 'application/grpc';
    r.headersOut['grpc-status'] = String(code);
    r.headersOut['grpc-message'] = grpcMessage(message);
    r.headersOut['Content-Length'] = '0';
    r.return(204);
}

// Runs `check(r)`; anything it throws refuses the request instead of nginx's HTML 500.
function guarded(check, grpc) {
    return function (r) {
        try {
            check(r);
        } catch (e) {
            var message = 'the gateway could not check this request (' + e.message + ')';
            if (grpc) {
                refuseGrpc(r, 3, message);
            } else {
                refuse(r, 400, message);
            }
        }
    };
}

// -- the body ------------------------------------------------------------------------------------------------

// The body as a Buffer, null when there is none (an empty Buffer is "detached" in njs: never touch it).
function bodyBuffer(r) {
    var body = r.requestBuffer;
    return (body === undefined || body === null || body.length === 0) ? null : body;
}

function compressed(r) {
    var encoding = r.headersIn['Content-Encoding'];
    return encoding !== undefined && encoding.toLowerCase() !== 'identity';
}

// The JSON text of a request: the whole body, or for an infer request with binary tensor data the first
// Inference-Header-Content-Length bytes. `limit` (bytes) bounds what will be parsed.
function jsonPart(r, body, headerOnly, limit) {
    if (body === null) {
        return {error: 'the request has no body; it must be a JSON object'};
    }
    var n = body.length;
    var length = r.headersIn['Inference-Header-Content-Length'];
    if (headerOnly && length !== undefined) {
        n = /^[0-9]{1,10}$/.test(length) ? Number(length) : -1;
        if (n < 1 || n > body.length) {
            return {error: 'Inference-Header-Content-Length is ' + length + '; it must be an integer in [1, '
                + body.length + '] (the body has ' + body.length + ' bytes)'};
        }
    }
    if (limit !== undefined && n > limit) {
        return {error: 'the JSON part of the request is ' + n + ' bytes; at most ' + limit
            + ' (json_max_text_bytes): send large tensors as binary data'};
    }
    return {text: n === body.length ? body.toString() : body.slice(0, n).toString(), length: n};
}

// A JSON string, with its escapes (a key token).
var STRING = /"[^"\\]*(?:\\.[^"\\]*)*"/g;
var STRING_OR_BRACKET = /("[^"\\]*(?:\\.[^"\\]*)*")(\s*:)?|[{}\[\]]/g;

// Keys held by the objects of a parsed value (walked without recursion: data lists can be long).
function parsedKeys(value) {
    var keys = 0;
    var stack = [value];
    while (stack.length > 0) {
        var item = stack.pop();
        if (Array.isArray(item)) {
            for (var i = 0; i < item.length; i++) {
                var v = item[i];
                if (typeof v === 'object' && v !== null) {
                    stack.push(v);
                }
            }
        } else {
            var names = Object.keys(item);
            keys += names.length;
            for (var j = 0; j < names.length; j++) {
                var w = item[names[j]];
                if (typeof w === 'object' && w !== null) {
                    stack.push(w);
                }
            }
        }
    }
    return keys;
}

// Members written in the text: outside strings, every ':' of valid JSON separates a key from its value.
function textMembers(text) {
    var bare = text.replace(STRING, '""');
    var count = 0;
    for (var at = bare.indexOf(':'); at >= 0; at = bare.indexOf(':', at + 1)) {
        count++;
    }
    return count;
}

// The first key written twice in one object (only looked for once a duplicate is known to exist).
function duplicateKey(text) {
    var stack = [];
    var match;
    STRING_OR_BRACKET.lastIndex = 0;
    while ((match = STRING_OR_BRACKET.exec(text)) !== null) {
        var token = match[0];
        if (token === '{') {
            stack.push({});
        } else if (token === '[') {
            stack.push(null);
        } else if (token === '}' || token === ']') {
            stack.pop();
        } else if (match[2] !== undefined && stack.length > 0 && stack[stack.length - 1] !== null) {
            var key = JSON.parse(match[1]);
            var seen = stack[stack.length - 1];
            if (seen['$' + key] === true) {  // ('$': no key is special, not even __proto__)
                return key;
            }
            seen['$' + key] = true;
        }
    }
    return null;
}

// The parsed JSON object of `text`, or {error}.
function parseObject(text) {
    var value;
    try {
        value = JSON.parse(text);
    } catch (e) {
        var nested = /Nested too deep/.test(e.message);
        return {error: nested ? 'the request JSON is nested deeper than 32 levels'
            : 'the request body is not valid JSON: ' + e.message};
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        return {error: 'the request body must be a JSON object'};
    }
    if (textMembers(text) !== parsedKeys(value)) {
        var key = duplicateKey(text);
        return {error: 'the request JSON has '
            + (key === null ? 'a key' : "the key '" + key + "'")
            + ' twice in one object; each key may appear once (readers disagree on which one counts)'};
    }
    return {value: value};
}

// -- tensors ---------------------------------------------------------------------------------------------------

// Element count of a declared shape, or {error}: a non-empty list of integers >= 1 whose product is at
// most `limit` (computed step by step, so it cannot overflow).
function shapeElements(name, shape, limit, what) {
    var shown = JSON.stringify(shape);
    if (!Array.isArray(shape) || shape.length === 0) {
        return {error: "input '" + name + "' shape must be a non-empty list of integers >= 1, not " + shown};
    }
    for (var i = 0; i < shape.length; i++) {
        var d = shape[i];
        if (typeof d !== 'number' || !Number.isInteger(d) || d < 1) {
            return {error: "input '" + name + "' shape must be a list of integers >= 1, not " + shown};
        }
    }
    var count = 1;
    for (var j = 0; j < shape.length; j++) {
        count *= shape[j];
        if (count > limit) {
            return {error: "input '" + name + "' declares shape " + shown + ' (more than ' + limit
                + ' elements); at most ' + limit + ' ' + what};
        }
    }
    return {count: count};
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

// Whether `size` bytes hold `count` elements of `datatype` (BYTES: a 4-byte length per element at least).
function sizeProblem(name, datatype, count, size) {
    var item = config.datatype_bytes[datatype];
    if (item === 0) {
        return count * 4 <= size ? null : "input '" + name + "' declares " + count
            + ' BYTES elements but carries ' + size + ' bytes (each element takes 4 bytes at least)';
    }
    return count * item === size ? null : "input '" + name + "' declares " + count + ' ' + datatype
        + ' elements (' + count * item + ' bytes) but carries ' + size + ' bytes';
}

function knownDatatype(name, datatype) {
    return (typeof datatype === 'string' && config.datatype_bytes.hasOwnProperty(datatype)) ? null
        : "input '" + name + "' datatype " + JSON.stringify(datatype) + ' is not one of '
            + Object.keys(config.datatype_bytes).sort().join(', ');
}

function usesSharedMemory(tensor) {
    var p = tensor.parameters;
    return typeof p === 'object' && p !== null && p.shared_memory_region !== undefined;
}

// `binaryBytes`: the bytes after the JSON part (binary tensor data).
function checkInferRequest(request, binaryBytes) {
    var inputs = request.inputs;
    if (!Array.isArray(inputs)) {
        return "the request must carry an 'inputs' list";
    }
    var binary = 0;
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
        var size = (typeof parameters === 'object' && parameters !== null) ? parameters.binary_data_size : undefined;
        var problem = knownDatatype(name, input.datatype);
        if (problem !== null) {
            return problem;
        }
        if (size !== undefined) {
            if (typeof size !== 'number' || !Number.isInteger(size) || size < 0 || binary + size > binaryBytes) {
                return "input '" + name + "' binary_data_size is " + JSON.stringify(size) + '; the body holds '
                    + (binaryBytes - binary) + ' more bytes of binary data';
            }
            binary += size;
            var declared = shapeElements(name, input.shape, binaryBytes, 'elements fit in the body');
            if (declared.error) {
                return declared.error;
            }
            problem = sizeProblem(name, input.datatype, declared.count, size);
            if (problem !== null) {
                return problem;
            }
            if (input.data !== undefined) {
                return "input '" + name + "' carries both JSON data and binary_data_size";
            }
            continue;
        }
        if (input.data === undefined) {
            return "input '" + name + "' carries neither JSON data nor binary_data_size";
        }
        var limit = config.json_max_elements;
        var shape = shapeElements(name, input.shape, limit, 'elements may be sent as JSON data (json_max_elements)');
        if (shape.error) {
            return shape.error;
        }
        var carried = dataElements(input.data, limit);
        if (carried !== shape.count) {
            return "input '" + name + "' declares shape " + JSON.stringify(input.shape) + ' (' + shape.count
                + ' elements) but carries ' + (carried > limit ? 'more than ' + limit : carried) + ' data values';
        }
    }
    if (binary !== binaryBytes) {
        return 'the body carries ' + binaryBytes + ' bytes of binary data after the JSON part; the inputs declare '
            + binary + ' (binary_data_size)';
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
    var body = bodyBuffer(r);
    var part = jsonPart(r, body, true, config.json_max_text_bytes);
    if (part.error) {
        refuse(r, 400, part.error);
        return;
    }
    var parsed = parseObject(part.text);
    if (parsed.error) {
        refuse(r, 400, parsed.error);
        return;
    }
    var problem = checkInferRequest(parsed.value, body.length - part.length);
    if (problem !== null) {
        refuse(r, 400, problem);
        return;
    }
    // Triton reads exactly the JSON part checked here (a second header of that name went unread above).
    r.variables.kandinsky_json_length = part.length === body.length ? '' : String(part.length);
    r.internalRedirect('@triton_infer');
}

// -- generate ---------------------------------------------------------------------------------------------------

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
    if (compressed(r)) {
        refuse(r, 400, 'compressed request bodies (Content-Encoding) are not accepted by the gateway; send them uncompressed');
        return;
    }
    var part = jsonPart(r, bodyBuffer(r), false, undefined);
    var parsed = part.error ? part : parseObject(part.text);
    if (parsed.error) {
        refuse(r, 400, parsed.error);
        return;
    }
    var request = parsed.value;
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
    r.internalRedirect(r.variables.kandinsky_stream ? '@triton_stream' : '@triton_infer');
}

// -- other routes ------------------------------------------------------------------------------------------------

// POST /v2/repository/index: no body, or a JSON object (Triton parses it).
function index(r) {
    var body = bodyBuffer(r);
    if (body !== null) {
        if (compressed(r)) {
            refuse(r, 400, 'compressed request bodies (Content-Encoding) are not accepted by the gateway');
            return;
        }
        var parsed = parseObject(body.toString());
        if (parsed.error) {
            refuse(r, 400, parsed.error);
            return;
        }
    }
    r.internalRedirect('@triton_index');
}

// GET routes: nothing to read (the body, if any, has arrived by now: refused), then Triton or the deep
// readiness endpoint.
function getter(target) {
    return function (r) {
        if (bodyBuffer(r) !== null) {
            refuse(r, 400, 'a GET request carries no body');
            return;
        }
        r.internalRedirect(target);
    };
}

// -- gRPC: ModelInferRequest (inference.GRPCInferenceService/ModelInfer) --------------------------------------
//
// Read the way protobuf reads it: unknown fields and fields of an unexpected wire type are skipped; the
// last value of a singular field counts; repeated fields (and the shape, packed or not) accumulate; a
// message field written twice is merged. Groups (wire types 3 and 4) are refused.

function varint(buf, at, end) {
    var value = 0;
    var scale = 1;
    for (var i = 0; i < 10; i++) {
        if (at >= end) {
            throw new Error('truncated varint');
        }
        var b = buf[at++];
        value += (b & 0x7f) * scale;
        if (b < 0x80) {
            return [value, at];
        }
        scale *= 128;
    }
    throw new Error('varint longer than 10 bytes');
}

// Calls visit(field, wire, value, start, end) for each field of buf[start:end]; value: the varint for
// wire type 0, else undefined (start/end: the payload of wire type 2).
function fields(buf, start, end, visit) {
    var at = start;
    while (at < end) {
        var tag = varint(buf, at, end);
        at = tag[1];
        var field = Math.floor(tag[0] / 8);
        var wire = tag[0] % 8;
        if (field < 1) {
            throw new Error('field number 0');
        }
        if (wire === 0) {
            var v = varint(buf, at, end);
            at = v[1];
            visit(field, 0, v[0], at, at);
        } else if (wire === 1 || wire === 5) {
            var size = wire === 1 ? 8 : 4;
            if (at + size > end) {
                throw new Error('truncated fixed-size field');
            }
            visit(field, wire, undefined, at, at + size);
            at += size;
        } else if (wire === 2) {
            var n = varint(buf, at, end);
            at = n[1];
            if (n[0] > end - at) {
                throw new Error('truncated length-delimited field');
            }
            visit(field, 2, undefined, at, at + n[0]);
            at += n[0];
        } else {
            throw new Error('wire type ' + wire + ' (groups are not accepted)');
        }
    }
}

// A varint read as int64: from 2^63 on, it is negative (-1 stands for all of them: refused the same).
function int64(value) {
    return value >= 9223372036854775808 ? -1 : value;
}

function utf8(buf, start, end) {
    return start === end ? '' : buf.slice(start, end).toString();
}

function packedVarints(buf, start, end, each) {
    var at = start;
    while (at < end) {
        var v = varint(buf, at, end);
        at = v[1];
        each(v[0]);
    }
}

// InferParameter map entries: the keys set.
function parameterKey(buf, start, end) {
    var key = '';
    fields(buf, start, end, function (field, wire, value, s, e) {
        if (field === 1 && wire === 2) {
            key = utf8(buf, s, e);
        }
    });
    return key;
}

// Contents fields 1-7 (scalars, packed or not) and 8 (bytes): element counts per field.
var CONTENTS_ITEM = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 4, 7: 8};  // 0: varint, else fixed bytes
var CONTENTS_WIRE = {6: 5, 7: 1};
var CONTENTS_FIELD = {BOOL: 1, INT8: 2, INT16: 2, INT32: 2, INT64: 3, UINT8: 4, UINT16: 4, UINT32: 4,
    UINT64: 5, FP32: 6, FP64: 7, BYTES: 8};

function countContents(buf, start, end, counts) {
    fields(buf, start, end, function (field, wire, value, s, e) {
        if (field === 8 && wire === 2) {
            counts[8] = (counts[8] || 0) + 1;
        } else if (CONTENTS_ITEM[field] !== undefined && wire === 2) {
            var item = CONTENTS_ITEM[field];
            var n = 0;
            if (item === 0) {
                packedVarints(buf, s, e, function () { n++; });
            } else {
                if ((e - s) % item !== 0) {
                    throw new Error('packed contents of a size that is not a multiple of ' + item);
                }
                n = (e - s) / item;
            }
            counts[field] = (counts[field] || 0) + n;
        } else if (CONTENTS_ITEM[field] !== undefined && wire === (CONTENTS_WIRE[field] || 0)) {
            counts[field] = (counts[field] || 0) + 1;
        }
    });
}

function readInput(buf, start, end) {
    var input = {name: '', datatype: '', shape: [], parameters: {}, contents: null};
    fields(buf, start, end, function (field, wire, value, s, e) {
        if (field === 1 && wire === 2) {
            input.name = utf8(buf, s, e);
        } else if (field === 2 && wire === 2) {
            input.datatype = utf8(buf, s, e);
        } else if (field === 3 && wire === 0) {
            input.shape.push(int64(value));
        } else if (field === 3 && wire === 2) {
            packedVarints(buf, s, e, function (d) { input.shape.push(int64(d)); });
        } else if (field === 4 && wire === 2) {
            input.parameters[parameterKey(buf, s, e)] = true;
        } else if (field === 5 && wire === 2) {
            input.contents = input.contents || {};
            countContents(buf, s, e, input.contents);
        }
    });
    return input;
}

function readRequest(buf, start, end) {
    var request = {inputs: [], outputs: [], raw: []};
    fields(buf, start, end, function (field, wire, value, s, e) {
        if (field === 5 && wire === 2) {
            request.inputs.push(readInput(buf, s, e));
        } else if (field === 6 && wire === 2) {
            var output = {name: '', parameters: {}};
            fields(buf, s, e, function (f, w, v, s2, e2) {
                if (f === 1 && w === 2) {
                    output.name = utf8(buf, s2, e2);
                } else if (f === 2 && w === 2) {
                    output.parameters[parameterKey(buf, s2, e2)] = true;
                }
            });
            request.outputs.push(output);
        } else if (field === 7 && wire === 2) {
            request.raw.push(e - s);
        }
    });
    return request;
}

function checkGrpcRequest(request, messageBytes) {
    var raw = request.raw;
    if (raw.length > 0 && raw.length !== request.inputs.length) {
        return 'the request carries ' + raw.length + ' raw_input_contents for ' + request.inputs.length
            + ' inputs; send one per input (or typed contents for all)';
    }
    for (var i = 0; i < request.inputs.length; i++) {
        var input = request.inputs[i];
        var name = input.name;
        if (input.parameters.shared_memory_region) {
            return "input '" + name + "': shared-memory inputs are not accepted through the gateway";
        }
        var problem = knownDatatype(name, input.datatype);
        if (problem !== null) {
            return problem;
        }
        var shape = shapeElements(name, input.shape, messageBytes, 'elements fit in the request');
        if (shape.error) {
            return shape.error;
        }
        if (raw.length > 0) {
            if (input.contents !== null) {
                return "input '" + name + "' carries contents beside raw_input_contents";
            }
            problem = sizeProblem(name, input.datatype, shape.count, raw[i]);
        } else if (input.contents !== null) {
            var wanted = CONTENTS_FIELD[input.datatype];
            var keys = Object.keys(input.contents);
            for (var k = 0; k < keys.length; k++) {
                if (Number(keys[k]) !== wanted && input.contents[keys[k]] > 0) {
                    return "input '" + name + "' of " + input.datatype + ' carries contents of another type';
                }
            }
            var carried = wanted === undefined ? 0 : (input.contents[wanted] || 0);
            if (carried !== shape.count) {
                problem = "input '" + name + "' declares " + shape.count + ' elements but carries ' + carried
                    + (wanted === undefined ? ' (' + input.datatype + ' travels as raw_input_contents only)' : '');
            }
        } else {
            problem = "input '" + name + "' carries no data (neither contents nor raw_input_contents)";
        }
        if (problem !== null) {
            return problem;
        }
    }
    for (var j = 0; j < request.outputs.length; j++) {
        if (request.outputs[j].parameters.shared_memory_region) {
            return "output '" + request.outputs[j].name + "': shared-memory outputs are not accepted through the gateway";
        }
    }
    return null;
}

// One length-prefixed gRPC message making up the whole body.
function grpcInfer(r) {
    var body = bodyBuffer(r);
    if (body === null || body.length < 5) {
        refuseGrpc(r, 3, 'the request carries no gRPC message');
        return;
    }
    if (body[0] !== 0) {
        refuseGrpc(r, 3, 'compressed gRPC messages are not accepted by the gateway; send them uncompressed');
        return;
    }
    var length = body.readUInt32BE(1);
    if (length !== body.length - 5) {
        refuseGrpc(r, 3, 'the request body is not one gRPC message (' + body.length + ' bytes, message of '
            + length + ')');
        return;
    }
    var problem = checkGrpcRequest(readRequest(body, 5, body.length), length);
    if (problem !== null) {
        refuseGrpc(r, 3, problem);
        return;
    }
    r.internalRedirect('@grpc_infer');
}

// Other gRPC methods: small messages Triton reads safely; read here first so that they count as in flight
// only once they have arrived.
function grpcPass(target) {
    return function (r) {
        r.internalRedirect(target);
    };
}

export default {
    infer: guarded(infer, false),
    generate: guarded(generate, false),
    index: guarded(index, false),
    get: guarded(getter('@triton_get'), false),
    health: guarded(getter('@health'), false),
    grpcInfer: guarded(grpcInfer, true),
    grpcPass: guarded(grpcPass('@grpc'), true),
    grpcIndex: guarded(grpcPass('@grpc_index'), true),
};
