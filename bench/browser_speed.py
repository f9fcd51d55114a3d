"""charnn.js in Chromium at H=256: typing, a fresh prefix, generation; WebAssembly SIMD vs
plain loops, in the same run.

    python bench/browser_speed.py [--hidden-size 256] [--rounds 5]

Writes the web export of a model with random weights over shakespeare.txt's characters
(the cost is the same as a trained model's) and charnn.js into a temporary folder,
serves it with a plain static file server on loopback, opens it in Debian's Chromium
(headless, through Playwright: `apt-get install chromium`) and times, in the page, for
each engine:

- typed: `predict` of a text one character longer than the last (each pays one step),
  the mean over 200 keystrokes after a 200-character start;
- fresh: `predict` of a 200-character slice sharing no prefix with the last (200 steps),
  the mean over 20;
- generate: characters/s of a 20,000-character sample at temperature 0.8.

Chromium coarsens `performance.now()` to 0.1 ms, so each figure is a total over many
calls divided by their number. Rounds alternate the engines; each line is one round.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from loadgen import cpu_name  # noqa: E402
from scale_out_serving import CORPUS  # noqa: E402

from model.checkpoint import ModelCheckpoint  # noqa: E402
from model.params import init_params  # noqa: E402
from model.vocab import Vocab  # noqa: E402
from model.web import web_bytes  # noqa: E402

PAGE = """<!doctype html><meta charset="utf-8"><title>bench</title>
<script type="module">import * as charnn from "./charnn.js"; window.charnn = charnn;
document.title = "ready";</script>"""

MEASURE = """async ({text, wasm, starts}) => {
  const m = await charnn.load("model.safetensors", {wasm});
  m.predict(text.slice(0, 400)); m.generateText({length: 500, seed: 0});  // warm the JIT
  m.predict("");
  m.predict(text.slice(0, 200));
  let t = performance.now();
  for (let k = 201; k <= 400; k++) m.predict(text.slice(0, k));
  const typed = (performance.now() - t) / 200;
  t = performance.now();
  for (const s of starts) m.predict(text.slice(s, s + 200));
  const fresh = (performance.now() - t) / starts.length;
  t = performance.now();
  const sample = await m.generateText({length: 20000, temperature: 0.8, seed: 1});
  const rate = sample.length / ((performance.now() - t) / 1000);
  return {engine: m.engine, typed, fresh, rate};
}"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    text = CORPUS.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    params = init_params(args.hidden_size, len(vocab), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    body = text[:200_000]  # typed from its start; fresh slices from anywhere after
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model.safetensors").write_bytes(web_bytes(ModelCheckpoint(params, vocab)))
        (folder / "charnn.js").write_bytes((ROOT / "app" / "static" / "charnn.js").read_bytes())
        (folder / "index.html").write_text(PAGE, encoding="utf-8")
        handler = functools.partial(_Quiet, directory=str(folder))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
            page.wait_for_function("document.title === 'ready'")
            print(
                f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_name()}  Chromium {browser.version}  "
                f"Python {platform.python_version()}  H={args.hidden_size}  V={len(vocab)}",
                flush=True,
            )
            seen: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for wasm in (True, False):
                    starts = rng.integers(1000, len(body) - 300, 20).tolist()
                    r = page.evaluate(MEASURE, {"text": body, "wasm": wasm, "starts": starts})
                    seen.setdefault(r["engine"], []).append(r)
                    print(
                        f"{r['engine']:<9s}  typed {r['typed']:6.3f} ms  fresh200 "
                        f"{r['fresh']:6.2f} ms  generate {r['rate']:8,.0f} chars/s",
                        flush=True,
                    )
            browser.close()
        httpd.shutdown()
    for engine, rows in seen.items():
        print(
            f"median {engine:<9s}  typed {statistics.median(r['typed'] for r in rows):6.3f} ms  "
            f"fresh200 {statistics.median(r['fresh'] for r in rows):6.2f} ms  generate "
            f"{statistics.median(r['rate'] for r in rows):8,.0f} chars/s"
        )


if __name__ == "__main__":
    main()
