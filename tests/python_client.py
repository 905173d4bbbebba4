#!/usr/bin/env python3
"""A client that is not ours: Python grpcio, stubs generated from proto/ at run time.
Sends one Generate to the given address and prints the generated token ids as JSON.

  python_client.py ROUTER_ADDR PROMPT MAX_TOKENS [--unknown-field | --invalid-utf8]

With a flag it sends a malformed request instead and prints the status code it got.
"""
import json, os, sys, tempfile

from grpc_tools import protoc
import grpc

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
out = tempfile.mkdtemp()
files = ["pdserve/v1/generate.proto", "pdserve/v1/internal.proto"]
if protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}"] + files) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out)
from pdserve.v1 import generate_pb2 as pb, generate_pb2_grpc as rpc  # noqa: E402

addr, prompt, max_tokens = sys.argv[1].removeprefix("http://"), sys.argv[2], int(sys.argv[3])
channel = grpc.insecure_channel(addr)
mode = sys.argv[4] if len(sys.argv) > 4 else ""
if mode in ("--unknown-field", "--invalid-utf8"):
    raw = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParameters(max_tokens=max_tokens)).SerializeToString()
    if mode == "--unknown-field":
        # The same request with one field no version of the API defines (number 999, varint 1).
        raw += b"\xb8\x3e\x01"
    else:
        # The prompt (field 2, a string) replaced by bytes that are not UTF-8.
        bad = b"\xff\xfe\xc3("
        raw = b"\x12" + bytes([len(bad)]) + bad + pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=max_tokens)).SerializeToString()
    # The streaming call for the bad prompt: Generate is what most clients use.
    if mode == "--invalid-utf8":
        call = channel.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString)
    else:
        call = channel.unary_unary("/pdserve.v1.Generation/GenerateOnce", request_serializer=lambda b: b, response_deserializer=pb.GenerateResult.FromString)
    try:
        out = call(raw, timeout=30)
        if mode == "--invalid-utf8":
            list(out)
        print(json.dumps({"code": "OK"}))
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "details": e.details()}))
    sys.exit(0)
stub = rpc.GenerationStub(channel)
req = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParameters(max_tokens=max_tokens))
tokens, result = [], None
for msg in stub.Generate(req, timeout=60):
    if msg.HasField("chunk"):
        tokens += list(msg.chunk.token_ids)
    else:
        result = msg.result
assert result is not None, "no final result"
assert tokens == list(result.token_ids), "chunks and result disagree"
print(json.dumps({"token_ids": tokens, "finish_reason": pb.FinishReason.Name(result.finish_reason)}))
