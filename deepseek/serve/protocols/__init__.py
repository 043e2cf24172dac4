"""Network front ends of ``ds serve``: KServe v2 over HTTP (:mod:`deepseek.serve.protocols.http_v2`)."""
