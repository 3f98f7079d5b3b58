"""A local imitation of discords.com's tag pages, on 127.0.0.1, for the crawler tests and benchmark.

Same class names and nesting as the real site; the items are inserted by
JavaScript after load (a plain HTTP fetch finds none); images sit behind a
`/_next/image?url=...` proxy route; Twemoji served as PNG and WebP; one image
repeated on the next page; one broken image; page 3 answers 500 once; page 4
is slow; optionally one page never renders; the page after the last renders an empty list.

`hydrate=True` serves the pages as a hydrating Next.js page does: the
container is in the HTML, and the items arrive later (the page fetches
`/api/tag/<tag>?page=N`, answered after `hydrate_s` seconds, different per
page, and inserts the items a few at a time); a page without items then shows
`<p class="no-emoji">`. `hold_from=N` holds the answers of pages N and up
until `release` is set (to interrupt a crawl halfway).
"""

from __future__ import annotations

import html
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlparse

from PIL import Image

PAGE = """<!doctype html><html><head><title>{tag} emoji</title></head><body>
<div id="__next"><main><h1>{tag}</h1></main></div>
<script>
setTimeout(() => {{
  const items = {items};
  const box = document.createElement("div");
  box.className = "FS5UE28h container";
  const grid = document.createElement("div");
  grid.className = "LQY5mtmC";
  for (const [src, title] of items) {{
    const item = document.createElement("div");
    item.className = "aLnnpRah text-center";
    const frame = document.createElement("div");
    frame.className = "Mw1EAtrx";
    const img = document.createElement("img");
    img.src = src; img.title = title;
    frame.append(img); item.append(frame); grid.append(item);
  }}
  box.append(grid);
  document.querySelector("main").append(box);
}}, 150);
</script></body></html>"""


HYDRATE_PAGE = """<!doctype html><html><head><title>{tag} emoji</title></head><body>
<div id="__next"><main><h1>{tag}</h1>
<div class="FS5UE28h container"><div class="LQY5mtmC"></div></div>
</main></div>
<script>
fetch({api}).then(r => r.json()).then(async items => {{
  const grid = document.querySelector("div.LQY5mtmC");
  if (!items.length) {{
    const none = document.createElement("p");
    none.className = "no-emoji"; none.textContent = "No emoji with this tag yet";
    grid.append(none);
  }}
  for (let i = 0; i < items.length; i++) {{
    if (i && i % 3 === 0) await new Promise(done => setTimeout(done, 60));  // streamed in, a few at a time
    const [src, title] = items[i];
    const item = document.createElement("div");
    item.className = "aLnnpRah text-center";
    const frame = document.createElement("div");
    frame.className = "Mw1EAtrx";
    const img = document.createElement("img");
    img.src = src; img.title = title;
    frame.append(img); item.append(frame); grid.append(item);
  }}
}});
</script></body></html>"""


class CrawlSite:
    """`pages` pages of `per_page` items (then one empty page), on a free loopback port."""

    def __init__(self, pages: int = 6, per_page: int = 6, slow_page: int = 4, flaky_page: int = 3,
                 slow_s: float = 1.0, dead_page: int = 0, hydrate: bool = False,
                 hydrate_s: tuple[float, float] = (0.5, 1.0), hold_from: int = 0):
        from emoji_ldm.sources.twemoji import twemoji_dir

        self.pages, self.per_page, self.slow_page, self.flaky_page, self.slow_s = (
            pages, per_page, slow_page, flaky_page, slow_s)
        self.dead_page = dead_page  # a page that never renders its list
        self.hydrate, self.hydrate_s = hydrate, hydrate_s
        self.hold_from = hold_from  # pages from this one on are not answered until `release.set()`
        self.release = threading.Event()
        files = sorted(twemoji_dir().glob("*.png"))[: pages * per_page]
        self.images: dict[str, bytes] = {}
        for i, f in enumerate(files):
            with Image.open(f) as im:
                buf = io.BytesIO()
                if i % 3 == 0:  # every third as WebP, as the real site serves
                    im.convert("RGBA").save(buf, format="WEBP", lossless=True)
                    self.images[f"{f.stem}.webp"] = buf.getvalue()
                else:
                    self.images[f"{f.stem}.png"] = f.read_bytes()
        self.images["broken.png"] = b"\x89PNG\r\n\x1a\n this is not an image"
        self.names = [n for n in self.images if n != "broken.png"]
        self.hits: Counter = Counter()
        self.failed_once: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def page_items(self, page: int) -> list[tuple[str, str]]:
        """(proxied src, title) of a page: its own images, the previous page's first one, page 2's broken one."""
        if page > self.pages:
            return []
        own = self.names[(page - 1) * self.per_page: page * self.per_page]
        names = own + ([self.names[(page - 2) * self.per_page]] if page > 1 else [])
        if page == 2:
            names.append("broken.png")
        return [(f"/_next/image?url={quote(self.base + '/img/' + n, safe='')}&w=128&q=75", f"blob{n.split('.')[0]}")
                for n in names]

    def hydrate_delay(self, page: int) -> float:
        """Seconds before page `page`'s items are answered (hydrate=True): spread over `hydrate_s`."""
        low, high = self.hydrate_s
        return low + (high - low) * ((page * 3) % 5) / 4

    def expected_images(self) -> set[str]:
        """Original URLs of the distinct, decodable images on pages 1..pages."""
        return {f"{self.base}/img/{n}" for n in self.names}

    def profile_yaml(self, **overrides) -> str:
        settings = {"name": "testsite", "url": self.base + "/emoji-list/tag/{tag}?page={page}", "pages": "1-1000",
                    "wait_for": "div.FS5UE28h.container", "item": "div.LQY5mtmC div.aLnnpRah.text-center",
                    "image": "div.Mw1EAtrx img", "image_url_attr": "src", "title_attr": "title",
                    "last_page": "empty", "unwrap": {"path": "/_next/image", "param": "url"},
                    "page_timeout_s": 3, **overrides}
        return json.dumps(settings)  # JSON is YAML

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                site.hits[url.path + ("?" + url.query if url.query else "")] += 1
                if url.path == "/robots.txt":
                    return self._send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
                if url.path.startswith("/api/tag/"):
                    page = int(parse_qs(url.query).get("page", ["1"])[0])
                    time.sleep(site.hydrate_delay(page))
                    return self._send(200, json.dumps(site.page_items(page)).encode(), "application/json")
                if url.path.startswith("/emoji-list/tag/"):
                    page = int(parse_qs(url.query).get("page", ["1"])[0])
                    if site.hold_from and page >= site.hold_from:
                        site.release.wait(60)
                    if page == site.flaky_page and self.path not in site.failed_once:
                        site.failed_once.add(self.path)
                        return self._send(500, b"<html><body>Internal Server Error</body></html>", "text/html")
                    if page == site.dead_page:
                        return self._send(200, b"<html><body><main>loading...</main></body></html>", "text/html")
                    if page == site.slow_page:
                        time.sleep(site.slow_s)
                    tag = html.escape(url.path.rsplit("/", 1)[-1])
                    if site.hydrate:
                        api = json.dumps(f"/api/tag/{url.path.rsplit('/', 1)[-1]}?page={page}")
                        body = HYDRATE_PAGE.format(tag=tag, api=api)
                    else:
                        body = PAGE.format(tag=tag, items=json.dumps(site.page_items(page)))
                    return self._send(200, body.encode(), "text/html")
                if url.path == "/_next/image":  # the proxy: serve the original's bytes
                    target = urlparse(parse_qs(url.query)["url"][0]).path
                    return self._image(target.rsplit("/", 1)[-1])
                if url.path.startswith("/img/"):
                    return self._image(url.path.rsplit("/", 1)[-1])
                return self._send(404, b"not found", "text/plain")

            def _image(self, name: str):
                data = site.images.get(name)
                if data is None:
                    return self._send(404, b"not found", "text/plain")
                return self._send(200, data, "image/webp" if name.endswith(".webp") else "image/png")

            def _send(self, code: int, body: bytes, ctype: str):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
