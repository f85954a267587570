"""Generated protobuf and gRPC code for rnnstream, shared by server and client."""
