"""serving depends on the twin file only (DESIGN.md): loading it pulls in none of the rest."""

import subprocess
import sys


def test_the_service_imports_nothing_of_training_or_the_model_library(twin_build):
    code = (
        "import sys\n"
        "from serving.app import create_app\n"
        "from serving.server import run_serve\n"
        "from serving.settings import load_settings\n"
        f"s = load_settings({{'model_uri': {str(twin_build.path)!r}, 'insecure': True}}, {{}})\n"
        "create_app(s)\n"
        "bad = [m for m in ('training', 'hybrid_twin', 'data_pipelines', 'mlflow', 'lightning')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
