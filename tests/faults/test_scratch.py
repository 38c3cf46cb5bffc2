import socket, time
from typer.testing import CliRunner
from flows.cli import app
from tests.flows.pipeline import write_config

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def test_dead(prefect_harness, tmp_path):
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{port}/v1")
    t = time.monotonic()
    r = CliRunner().invoke(app, ["build", "--config", str(config)])
    print("TIME", time.monotonic() - t, r.exit_code)
    print(r.output)
    print(r.exception)
    import subprocess; print(subprocess.run(["find", str(tmp_path)], capture_output=True, text=True).stdout)
