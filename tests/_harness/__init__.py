"""The tests' shared harness, one pytest plugin (``_harness.plugin``, registered by tests/conftest.py).

======================  =========================================================================
``env``                 the session's state folder and quiet environment (set on import), the
                        environment of subprocesses and servers, restored_environ, one torch thread
``procs``               free ports, processes with their output in files, the CLI in a
                        subprocess, waiting (for a condition, for HTTP), stopping, killing a group
``mlflow_server``       ``MlflowServer`` (start, wait, crash, stop, ensure_up), ``TcpGate``
``runs``                the one digits trainer and the session's digits run, MLflow's globals,
                        the core as oracle (``core_scores``, ``direct_scores``), ``Once``
``iris``                ``MlflowStore``: small iris runs with a knob for each defect
``files``               cells of a results store, leftovers of an output folder, secrets in files
``plugin``              the fixtures: Prefect's test server, the digits run, the MLflow server...
======================  =========================================================================

tests/ is on ``sys.path`` (tests/conftest.py lives there), so ``import _harness`` works from every
test module and conftest. The ``support`` fixture is this package.
"""

from .env import (
    BIN,
    REPO_ROOT,
    STATE,
    TESTS,
    one_torch_thread,
    quiet_env,
    restored_environ,
    server_env,
    subprocess_env,
)
from .files import CELL_FIELDS, assert_complete_cells, cell_files, files_containing, leftovers, torch_save_declaring
from .mlflow_server import MlflowServer, TcpGate
from .procs import (
    answers,
    cli_output,
    free_port,
    kill_group,
    start_cli,
    start_logged,
    stop_process,
    tail,
    wait_for,
    wait_for_http,
)
from .runs import (
    DigitsRun,
    Once,
    core_scores,
    digits_run,
    direct_scores,
    guard_mlflow_globals,
    mlflow_target,
    sqlite_store,
    train_digits,
)

__all__ = [
    "BIN", "CELL_FIELDS", "REPO_ROOT", "STATE", "TESTS", "DigitsRun", "MlflowServer", "Once", "TcpGate", "answers",
    "assert_complete_cells", "cell_files", "cli_output", "core_scores", "digits_run", "direct_scores",
    "files_containing", "free_port", "torch_save_declaring", "guard_mlflow_globals", "kill_group", "leftovers", "mlflow_target",
    "one_torch_thread", "quiet_env", "restored_environ", "server_env", "sqlite_store", "start_cli", "start_logged",
    "stop_process", "subprocess_env", "tail", "train_digits", "wait_for", "wait_for_http",
]
