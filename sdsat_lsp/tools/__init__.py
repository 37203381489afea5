"""Tools around the product, not part of it: the benchmarks (`bench`, `session_bench`), the stress
run (`stress`, over the JSON-RPC client in `lspclient`), completion quality (`evaluate`). The
server never imports these."""
