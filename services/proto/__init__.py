"""Generated gRPC/protobuf stubs for `protos/` (regenerate with `elastune protos`)."""
