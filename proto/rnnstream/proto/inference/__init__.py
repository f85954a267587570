"""Open Inference Protocol (KServe v2) gRPC subset with Triton's extensions (generated)."""
