"""Client-side benchmark tools behind ``ds bench``: load generators that drive a running server.

    from deepseek.bench.loadgen import build_kserve_bodies, run_load        # KServe v2 infer, closed/open loop
    from deepseek.bench.streamload import completion_bodies, run_stream_load   # streaming OpenAI completions

They talk to a server over sockets only and import nothing of :mod:`deepseek.serve`.
"""
