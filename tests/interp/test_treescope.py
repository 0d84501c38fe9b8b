"""Treescope renders models, named arrays and captured activations in a browser.

The HTML treescope writes for a notebook is opened in headless Chromium
(Debian's `chromium`, which `.ci/run` installs); the page must run without
script errors and its rendered (shadow-DOM) text must show the model.
"""

import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import pytest
import treescope
from penzai import pz

from recurrent_lm import interp
from recurrent_lm.models import griffin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Skips without Chromium, except under ``CI=true``: CI installs it
    (.ci/run), so there a missing browser is a broken set-up, and a skip would
    let the run pass with nothing rendered."""
    if CHROMIUM is None:
        need = "needs headless Chromium (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but no chromium is on PATH: the treescope test {need}", pytrace=False)
        pytest.skip(need)
    return CHROMIUM


# Records script errors on <html> and, once the page has settled, copies the
# text treescope rendered into its shadow roots into <pre id="rendered">.
PROBE = """<script>
const note = (message) => document.documentElement.setAttribute(
  'data-script-errors', (document.documentElement.getAttribute('data-script-errors') || '') + message + ';');
window.addEventListener('error', e => note(e.message));
window.addEventListener('unhandledrejection', e => note(String(e.reason)));
const shadowText = () => {
  let text = '';
  const visit = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { text += el.shadowRoot.textContent; visit(el.shadowRoot); }
    }
  };
  visit(document);
  return text;
};
// Treescope renders asynchronously, showing "(Loading...)" until it is done.
let polls = 0;
const poll = () => {
  const text = shadowText();
  if ((text.length > 0 && !text.includes('(Loading...)')) || ++polls > 120) {
    const out = document.createElement('pre');
    out.id = 'rendered';
    out.textContent = text;
    document.body.appendChild(out);
  } else {
    setTimeout(poll, 500);
  }
};
window.addEventListener('load', () => setTimeout(poll, 500));
</script>"""


def render_in_chromium(value, tmp_path) -> tuple[list[str], str]:
    """(script errors, rendered text) of treescope's HTML for `value`.

    Uncompressed: compressed output (the notebook default) is the same HTML,
    gzipped, and decoded only once an IntersectionObserver reports the element
    visible, which headless Chromium on a loaded machine does not always do.
    """
    page = tmp_path / "page.html"
    page.write_text(
        f"<!DOCTYPE html><html><head>{PROBE}</head><body>"
        f"{treescope.render_to_html(value, roundtrip_mode=False, compressed=False)}</body></html>"
    )
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--run-all-compositor-stages-before-draw", "--window-size=1200,2000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=60000", "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=180, check=True,
    )
    errors = re.findall(r'data-script-errors="([^"]*)"', result.stdout)
    rendered = re.search(r'<pre id="rendered">(.*?)</pre>', result.stdout, re.DOTALL)
    assert rendered is not None, "the page never finished loading"
    text = rendered.group(1)
    assert "(Loading...)" not in text, "treescope had not finished rendering"
    return errors, text


@pytest.fixture(scope="module")
def model():
    config = griffin.GriffinConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=48,
        num_hidden_layers=3, attention_window_size=8,
    )
    return griffin.build_model(config, jax.random.key(0))


def test_model_renders(model, tmp_path):
    errors, text = render_in_chromium(model, tmp_path)
    assert errors == []
    for expected in ("DecoderLM", "RGLRU", "hidden_state", "GriffinConfig", "embedder.embeddings"):
        assert expected in text
    # A parameter's named axes, as the rendered NamedArray summary shows them.
    assert "vocabulary:64,embedding:32" in text.replace(" ", "")


def test_captured_activations_render(model, tmp_path):
    tokens = pz.nx.wrap(jnp.array([[1, 2, 3, 4]]), "batch", "seq")
    _, cache = interp.run_with_cache(model, tokens, names="**.hidden_state")
    errors, text = render_in_chromium(cache, tmp_path)
    assert errors == []
    assert "blocks.0.temporal_block.rg_lru.hidden_state" in text
    assert "NamedArray" in text and "lru:32" in text.replace(" ", "")
