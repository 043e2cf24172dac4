"""KServe v2 repository and management routes: the index, load/unload, routing policies and A/B experiments.

    POST           /v2/repository/index                      [{name, version, state, reason}] (open)
    POST           /v2/repository/models/{m}/load | unload   ``--model-control explicit`` only
    POST           /v2/repository/models/{m}/adapters/{a}/load   {"path": DIR}: serve LoRA adapter DIR as m:a
    POST           /v2/repository/models/{m}/adapters/{a}/unload new requests may no longer pick m:a
    GET|PUT|DELETE /v2/models/{m}/routing                    pinned / weighted canary / A/B policy
    GET            /v2/models/{m}/experiment                 the A/B report
    POST           /v2/models/{m}/experiment/outcome         {"key", "metric", "value"}

All but the index need the API key (``Authorization: Bearer KEY`` or ``X-API-Key``): 401 without it, 403 on a
server started without one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek.serve.errors import NOT_FOUND, RequestError
from deepseek.serve.manager import ModelManager
from deepseek.serve.protocols.http_context import parse_json_object, read_json_object, serving
from deepseek.serve.protocols.http_errors import KServeRoute
from deepseek.serve.routing import ABTest, parse_policy

router = APIRouter(route_class=KServeRoute)


# -- repository --------------------------------------------------------------------------------------------

@router.post("/v2/repository/index")
async def repository_index(request: Request):
    ctx = serving(request)
    body = await ctx.read_body(request.headers, request.receive)
    ready_only = parse_json_object(body).get("ready", False) if body.strip() else False
    if not isinstance(ready_only, bool):
        raise RequestError(f"'ready' must be a boolean, got {ready_only!r}", param="ready")
    return ctx.manager.index(ready_only=ready_only)


@router.post("/v2/repository/models/{model}/load")
async def repository_load(request: Request, model: str):
    ctx = serving(request)
    ctx.authorize(request.headers)
    body = await ctx.read_body(request.headers, request.receive)
    if body.strip() and parse_json_object(body).get("parameters"):
        raise RequestError("load parameters (config override, files) are not supported; "
                           "change the repository and load again", param="parameters")
    await ctx.manager.api_load(model)
    return Response(status_code=200)


@router.post("/v2/repository/models/{model}/unload")
async def repository_unload(request: Request, model: str):
    ctx = serving(request)
    ctx.authorize(request.headers)
    await ctx.read_body(request.headers, request.receive)
    await ctx.manager.api_unload(model)
    return Response(status_code=200)


@router.post("/v2/repository/models/{model}/adapters/{adapter}/load")
async def adapter_load(request: Request, model: str, adapter: str):
    """Any control mode: adapters change what a loaded model serves, not which models are loaded. The path is a
    directory on the server (relative: to the server's working directory); nothing is uploaded."""
    ctx = serving(request)
    ctx.authorize(request.headers)
    path = parse_json_object(await ctx.read_body(request.headers, request.receive)).get("path")
    if not isinstance(path, str) or not path:
        raise RequestError("'path' must be the adapter directory on the server", param="path")
    versions = await ctx.manager.load_adapter(model, adapter, path)  # AdapterError (a ValueError): 400
    return {"model": model, "adapter": adapter, "versions": versions}


@router.post("/v2/repository/models/{model}/adapters/{adapter}/unload")
async def adapter_unload(request: Request, model: str, adapter: str):
    ctx = serving(request)
    ctx.authorize(request.headers)
    await ctx.read_body(request.headers, request.receive)
    versions = await ctx.manager.unload_adapter(model, adapter)
    return {"model": model, "adapter": adapter, "versions": versions}


# -- routing and experiments -------------------------------------------------------------------------------

def known_model(request: Request, model: str) -> ModelManager:
    """The manager, after checking the key and that ``model`` is served (404 otherwise)."""
    ctx = serving(request)
    ctx.authorize(request.headers)
    if not ctx.manager.has_model(model):
        raise RequestError(f"unknown model {model!r}", NOT_FOUND)
    return ctx.manager


@router.get("/v2/models/{model}/routing")
async def get_routing(request: Request, model: str):
    return known_model(request, model).router.policy(model).describe()


@router.put("/v2/models/{model}/routing")
async def put_routing(request: Request, model: str):
    manager = known_model(request, model)
    policy = parse_policy(await read_json_object(request))  # ConfigError: 400
    manager.router.set_policy(model, policy)
    return policy.describe()


@router.delete("/v2/models/{model}/routing")
async def delete_routing(request: Request, model: str):
    ctx = serving(request)
    ctx.authorize(request.headers)
    ctx.manager.router.clear(model)
    return ctx.manager.router.policy(model).describe()


def running_experiment(request: Request, model: str) -> ABTest:
    """The model's A/B test (404 when its routing policy is another one)."""
    policy = known_model(request, model).router.policy(model)
    if not isinstance(policy, ABTest):
        raise RequestError(f"model {model!r} has no A/B experiment running (its routing policy is "
                           f"{policy.kind!r}); start one with PUT v2/models/{model}/routing", NOT_FOUND)
    return policy


@router.get("/v2/models/{model}/experiment")
async def experiment_report(request: Request, model: str):
    return running_experiment(request, model).report()


@router.post("/v2/models/{model}/experiment/outcome")
async def experiment_outcome(request: Request, model: str):
    experiment = running_experiment(request, model)
    data = await read_json_object(request)
    key, metric, value = data.get("key"), data.get("metric"), data.get("value", 1.0)
    if not isinstance(key, str) or not isinstance(metric, str):
        raise RequestError("an outcome needs 'key' (the routing key) and 'metric' strings")
    try:
        variant = experiment.record_outcome(key, metric, value)
    except LookupError as exc:  # a key the experiment never routed
        raise RequestError(str(exc.args[0] if exc.args else exc), NOT_FOUND) from None
    except TypeError as exc:  # a value that is not a number
        raise RequestError(str(exc), param="value") from None
    return {"key": key, "metric": metric, "variant": variant}
