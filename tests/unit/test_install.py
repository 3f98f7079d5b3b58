"""infra/install.py: what of pip's configuration uv is handed (uv reads no pip.conf)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("install", REPO / "infra" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


def test_a_variable_wins_over_the_install_section_which_wins_over_global():
    listing = ("global.find-links='/from/file'\n:env:.find-links='/from/env'\nglobal.index-url='https://a.example/simple'\n"
               "install.constraint='/c.txt'\nglobal.constraint='/g.txt'\n:env:.default-timeout='180'\nglobal.cert='/ca.crt'\n")
    assert install.parse_pip_config(listing) == {"find-links": "/from/env", "index-url": "https://a.example/simple",
                                                 "constraint": "/c.txt", "default-timeout": "180",
                                                 "cert": "/ca.crt"}


def test_uv_gets_each_value_and_no_local_folder_that_is_not_there(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    settings = {"extra-index-url": f"file://{tmp_path}/simple file:///no/such/simple https://b.example/simple",
                "find-links": f"{wheels} /no/such/wheels", "index-url": "https://a.example/simple",
                "default-timeout": "180"}
    (tmp_path / "simple").mkdir()
    assert install.uv_flags(settings) == [
        "--index-strategy", "unsafe-best-match", "--index-url", "https://a.example/simple",
        "--extra-index-url", f"file://{tmp_path}/simple", "--extra-index-url", "https://b.example/simple",
        "--find-links", str(wheels)]
