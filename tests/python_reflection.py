#!/usr/bin/env python3
"""A client that knows nothing of pdserve's API: it discovers the services through server
reflection with Python's official `grpcio-reflection` (which speaks v1alpha), builds the
request type from the descriptors the server sends, and calls Generate.
Prints JSON: the services listed and the generated token ids.

  python_reflection.py ADDR PROMPT MAX_TOKENS
  python_reflection.py ADDR --list 0        # only list the services
"""
import json, sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

addr, prompt, max_tokens = sys.argv[1].removeprefix("http://"), sys.argv[2], int(sys.argv[3])
channel = grpc.insecure_channel(addr)
db = ProtoReflectionDescriptorDatabase(channel)
services = sorted(db.get_services())
if prompt == "--list":
    print(json.dumps({"services": services}))
    sys.exit(0)
pool = descriptor_pool.DescriptorPool(db)
svc = pool.FindServiceByName("pdserve.v1.Generation")
method = svc.FindMethodByName("Generate")
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)
req = Request(text=prompt)
req.sampling.max_tokens = max_tokens
call = channel.unary_stream(f"/{svc.full_name}/{method.name}", request_serializer=Request.SerializeToString, response_deserializer=Response.FromString)
tokens = []
for msg in call(req, timeout=60):
    if msg.HasField("chunk"):
        tokens += list(msg.chunk.token_ids)
print(json.dumps({"services": services, "token_ids": tokens}))
