"""The web playground in a real browser: Debian's Chromium, driven by Playwright, against a real ``ds serve``.

The browser tests are skipped where the browser or the playwright package is missing, unless CI is set: there a
missing browser is a failure (``.ci/install-browser`` installs it). Playwright never downloads a browser of its own.
"""

import contextlib
import os
import re

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import deepseek as ds
from deepseek.serve.playground import register_playground

from .gated_model import free_port
from .test_cli_serve import start_server, stop, wait_ready

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODEL = "tiny-lm"
KEY = "playground-key"
WAIT_MS = 60_000  # generous bound for anything the page waits on; reaching it is a failure, not a timing

_MISSING = [what for what, ok in (("the playwright package (pip install -e '.[dev]')", sync_playwright is not None),
                                  (f"{CHROMIUM} (run .ci/install-browser as root)", os.path.exists(CHROMIUM)))
            if not ok]


def test_the_page_and_its_assets_are_served_and_load_nothing_from_outside():
    app = FastAPI()
    register_playground(app)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
            answer = client.get(f"/playground/{asset}")
            assert answer.status_code == 200 and kind in answer.headers["content-type"], asset
            assert not re.search(r"(https?:)?//[\w.-]+\.\w", re.sub(r"^\s*//.*$", "", answer.text, flags=re.M)), \
                f"{asset} refers to another host"
        assert client.get("/playground/nope.js").status_code == 404


@pytest.fixture(scope="module")
def browser():
    if _MISSING:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser test cannot run: missing {' and '.join(_MISSING)}")
        pytest.skip(f"browser test needs {' and '.join(_MISSING)}")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("playground") / MODEL
    ds.save(ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer(), path)
    return path


@contextlib.contextmanager
def serve(model_dir, *args: str):
    """``ds serve MODEL_DIR`` on a free port; yields the base URL, then stops it (SIGTERM, a clean exit)."""
    port = free_port()
    server = start_server(str(model_dir), "--http-port", str(port), "--no-grpc", "--torch-threads", "1", *args)
    try:
        wait_ready(server, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@pytest.fixture(scope="module")
def base(browser, model_dir):  # after `browser`: no server is started for a test that is skipped
    with serve(model_dir) as url:
        yield url


@pytest.fixture
def page(browser):
    """A fresh page that records every request it makes and every script error or console error."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()


def generate(page, prompt: str, max_tokens: int = 16) -> str:
    """Type ``prompt``, click Generate and wait for the request to end; its final status (done, error, ...).

    Greedy: the seeded model's text is then the same on every run (sampling could pick end-of-sequence first)."""
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#generate")  # its handler sets the status to "waiting" before the click returns
    expect(page.locator("#status")).to_have_text(re.compile(r"^(done|error|stopped)$"))
    return page.locator("#status").text_content()


def assert_done(page, status: str) -> None:
    assert status == "done", f"the request ended {status!r}: {page.locator('#error').text_content()}"


@pytest.mark.browser
def test_playground_streams_a_completion_and_charts_the_server_metrics(base, page):
    page.goto(f"{base}/")
    expect(page.locator("#model")).to_have_value(MODEL)  # the list came from /v1/models
    expect(page.locator("#version option")).to_have_count(2)  # auto (routing) and version 1

    assert_done(page, generate(page, "The quick brown fox"))
    expect(page.locator("#error")).to_have_text("")
    assert int(page.locator("#output").get_attribute("data-chunks")) >= 1
    assert page.locator("#output").text_content()
    assert re.fullmatch(r"\d+ ms", page.locator("#ttft").text_content())
    assert 1 <= int(page.locator("#tokens").text_content()) <= 16  # the usage chunk's completion_tokens
    expect(page.locator("#finish")).to_have_text(re.compile(r"^(stop|length)$"))

    # The metrics polled after the request saw it finish: a rate above zero, a p99 latency, and the gauges.
    page.wait_for_function("""() => {
        const chart = (name) => document.getElementById(`chart-${name}`).dataset;
        return Number(chart("rps").max) > 0 && Number(chart("tokens").max) > 0 && Number(chart("p99").samples) >= 1
            && Number(chart("batch").samples) >= 1 && Number(chart("kv").samples) >= 1;
    }""")
    assert float(page.locator("#chart-p99").get_attribute("data-max")) > 0

    # Chat mode streams through /v1/chat/completions.
    page.select_option("#mode", "chat")
    page.select_option("#version", "1")
    assert_done(page, generate(page, "Hello"))
    assert int(page.locator("#output").get_attribute("data-chunks")) >= 1

    assert page.requests and all(url.startswith(f"{base}/") for url in page.requests), page.requests
    assert any(url.endswith("/v1/chat/completions") for url in page.requests)
    assert not page.errors, page.errors


@pytest.mark.browser
def test_playground_shows_the_servers_error(base, page):
    page.goto(f"{base}/")
    expect(page.locator("#model")).to_have_value(MODEL)
    page.evaluate("""() => {  // a version the server does not have
        const version = document.getElementById("version");
        version.add(new Option("99", "99"));
        version.value = "99";
    }""")
    assert generate(page, "hi") == "error"
    expect(page.locator("#error")).to_contain_text(re.compile(r"HTTP 4\d\d: \S"))
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


@pytest.mark.browser
def test_playground_sends_the_api_key_when_inference_is_protected(browser, model_dir):
    with serve(model_dir, "--api-key", KEY, "--protect-inference") as url, contextlib.closing(browser.new_page()) as page:
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{url}/")
        page.fill("#api-key", KEY)
        page.locator("#api-key").dispatch_event("change")  # (re)lists the models with the key
        expect(page.locator("#model")).to_have_value(MODEL)
        assert_done(page, generate(page, "with a key"))

        page.fill("#api-key", "wrong")
        page.locator("#api-key").dispatch_event("change")
        assert generate(page, "with a wrong key") == "error"
        expect(page.locator("#error")).to_contain_text("HTTP 401")
