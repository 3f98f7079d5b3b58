"""Headless Chromium through Selenium, started the way these machines need (docs/datasets.md, "Chromium")."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

from emoji_ldm.errors import UserError

CHROMIUM = os.environ.get("EMOJI_LDM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EMOJI_LDM_CHROMEDRIVER", "/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which a closed
# network refuses; --disable-dev-shm-usage because containers have a tiny /dev/shm. The crawler reads pages in
# several windows at once: without the three backgrounding flags one not in front runs its timers once a second.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--disable-sync", "--disable-quic", "--window-size=1280,1024", "--disable-background-timer-throttling",
         "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows")
# A real browser's user-agent, with our name appended so site operators can tell who we are.
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36 "
              "emoji-ldm/0.1 (+https://github.com/emoji-ldm/emoji-ldm)")


class Browser:
    """One Chromium with its own fresh profile folder; `quit()` removes both."""

    def __init__(self, page_timeout_s: float = 20.0, user_agent: str = USER_AGENT,
                 download_dir: str | None = None, images: bool = True):
        from selenium import webdriver

        if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
            raise UserError(f"Chromium is missing ({CHROMIUM}, {CHROMEDRIVER}): "
                            "apt-get install -y chromium chromium-driver")
        self.profile = tempfile.mkdtemp(prefix="emoji-ldm-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--user-agent={user_agent}")
        prefs = {}
        if download_dir:
            prefs.update({"download.default_directory": download_dir, "download.prompt_for_download": False})
        if not images:
            # A crawler reads the <img> attributes and downloads the originals itself: the browser need not
            # fetch every picture through the site's proxy (kinder to the site, and pages finish sooner).
            prefs["profile.managed_default_content_settings.images"] = 2
            options.page_load_strategy = "eager"  # DOMContentLoaded: the items come from scripts anyway
        if prefs:
            options.add_experimental_option("prefs", prefs)
        # ChromeDriver in a process group of its own, which the Chromium it starts joins; a reaper ends that group
        # when this process dies without quit() (a Ray actor killed, a crawl stopped with Ctrl-C), so no
        # orphaned browser outlives its owner
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER, popen_kw={"start_new_session": True})
        self.driver = webdriver.Chrome(options=options, service=service)
        self._group = service.process.pid  # ChromeDriver's process group: Chromium's processes are in it too
        self._reaper = _reaper(owner=os.getpid(), group=self._group, profile=self.profile)
        self.driver.set_page_load_timeout(page_timeout_s)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            # what the reaper would do, done here before the reaper goes: `driver.quit()` can return (or fail)
            # with Chromium still running, e.g. when the actor is torn down while a page is loading
            for group in (self._group, self._reaper):
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # already gone
            shutil.rmtree(self.profile, ignore_errors=True)


def _reaper(owner: int, group: int, profile: str) -> int:
    """A shell loop that waits for `owner` to exit, then kills process group `group` and removes `profile`;
    returns the loop's process group.

    The loop runs detached (its shell exits at once, so it is nobody's child): Ray kills the child processes
    of an actor it kills, and a reaper that was one would die with the ChromeDriver and leave Chromium.
    """
    import shlex
    import subprocess

    loop = (f"while kill -0 {owner} 2>/dev/null; do sleep 1; done; "
            f"kill -KILL -{group} 2>/dev/null; rm -rf {shlex.quote(profile)}")
    shell = subprocess.Popen(["/bin/sh", "-c", f"({loop}) &"], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shell.wait()
    return shell.pid  # the session's group: the detached loop stays in it
