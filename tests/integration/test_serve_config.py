"""serve_config.yaml deployed by Ray's own CLI on a local Ray: `serve run serve_config.yaml`.

The config names the library where cluster nodes hold it (/home/ray/tryage/...), which does not
exist here. The test deploys the file as it is except for that path (a smoke library built for
the session) and the HTTP address (a free local port): import path, app name, route prefix and
the arguments' shape are the repo's own.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
import yaml

from tests.integration.conftest import ROOT, free_port
from tests.integration.test_cli import BIN, interrupt_group, wait_healthy


@pytest.mark.slow  # its own Ray and `serve run`: about a minute on 2 CPUs (-m slow)
def test_serve_config_deploys_with_serve_run(tmp_path, smoke_library):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["library"] = str(smoke_library)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    # Its own local Ray (`--address local`), never the session's or another one found on
    # this machine.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "serve-run.log"  # a file, not a pipe nobody drains while the test runs
    with log.open("w") as out:
        proc = subprocess.Popen(
            [BIN / "serve", "run", "--address", "local", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, as a terminal would give it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["gen-xs", "gen-s", "gen-m", "mask-s"]
        body = {"prompt": "hello [flag: smallest]", "max_new_tokens": 3}
        r = httpx.post(f"{url}/v1/infer", json=body, timeout=120)  # a cold start included
        assert r.status_code == 200, r.text
        assert r.json()["expert"] == "gen-xs"
    except BaseException:
        print(log.read_text()[-4000:])  # shown with the failure
        raise
    finally:
        # What is tested here is the deployment; Ctrl-C is test_cli's.
        interrupt_group(proc)
