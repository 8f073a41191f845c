"""Ephemeral execution against the real Docker Engine: behaviour, state isolation, env."""

from __future__ import annotations

import json
import logging

import pytest

from execbox import Executor
from execbox.engine.base import Engine
from execbox.exceptions import EngineError
from execbox.labels import MANAGED_FILTER

pytestmark = pytest.mark.docker


def test_hello_in_each_language(executor: Executor) -> None:
    js = executor.execute('console.log("hello")', language="javascript")
    py = executor.execute("print('hello')", language="python")
    sh = executor.execute("echo hello", language="bash")
    for r in (js, py, sh):
        assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "", 0)
        assert not (r.timed_out or r.oom_killed or r.output_truncated)
        assert r.duration_ms > 0
    assert (js.language, py.language, sh.language) == ("javascript", "python", "bash")


def test_exit_codes_stderr_and_uncaught_errors(executor: Executor) -> None:
    r = executor.execute("import sys; print('out'); print('err', file=sys.stderr); sys.exit(7)", language="python")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 7)
    r = executor.execute("raise ValueError('boom')", language="python")
    assert r.exit_code == 1 and "ValueError: boom" in r.stderr
    r = executor.execute("throw new Error('kaboom')", language="javascript")
    assert r.exit_code == 1 and "Error: kaboom" in r.stderr
    r = executor.execute("process.exit(4)", language="js")
    assert r.exit_code == 4
    r = executor.execute("kill -TERM $$", language="bash")
    assert (r.exit_code, r.signal) == (143, 15)


def test_env_reaches_code_in_both_languages(executor: Executor) -> None:
    env = {"KEYBOARD_STRIPE_KEY": "sk_test_1", "_X2": "a b=c\nd"}
    js = executor.execute("console.log(JSON.stringify([process.env.KEYBOARD_STRIPE_KEY, process.env._X2]))", env)
    assert json.loads(js.stdout) == ["sk_test_1", "a b=c\nd"]
    py = executor.execute(
        "import os, json; print(json.dumps([os.environ['KEYBOARD_STRIPE_KEY'], os.environ['_X2']]))",
        env,
        language="python",
    )
    assert json.loads(py.stdout) == ["sk_test_1", "a b=c\nd"]
    # Env of one run is not seen by the next.
    assert executor.execute("console.log(String(process.env.KEYBOARD_STRIPE_KEY))").stdout == "undefined\n"


def test_stdin_and_files(executor: Executor) -> None:
    r = executor.execute(
        "import sys; print(sys.stdin.read().upper(), open('data/in.txt').read())",
        language="python",
        stdin="abc",
        files={"data/in.txt": "file!"},
    )
    assert r.stdout == "ABC file!\n"


def test_env_values_never_in_container_config_or_logs(
    executor: Executor, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk_live_very_secret_value_42"
    seen: list[str] = []

    def inspect_while_running(stream: str, chunk: bytes) -> None:
        if seen:
            return
        for res in engine.list_resources(MANAGED_FILTER):
            if res.kind == "container":
                seen.append(json.dumps(engine.api.inspect_container(res.id)))  # type: ignore[attr-defined]

    with caplog.at_level(logging.DEBUG, logger="execbox"):
        r = executor.execute(
            "console.log('running'); setTimeout(() => console.log(process.env.K.length), 300)",
            {"K": secret},
            on_output=inspect_while_running,
        )
    assert r.stdout == f"running\n{len(secret)}\n"
    assert seen, "no running sandbox was inspected"
    assert all(secret not in s for s in seen)
    assert any('"Running": true' in s for s in seen)
    assert secret not in caplog.text
    assert r.id in caplog.text  # the run was logged, with its id


@pytest.mark.parametrize("language", ["python", "javascript"])
def test_seed_file_written_to_tmp_does_not_persist(executor: Executor, language: str) -> None:
    if language == "python":
        write = "open('/tmp/data.txt','w').write('hello'); print('File written')"
        check = "import os; print('File exists:', os.path.exists('/tmp/data.txt'))"
        expect = ("File written\n", "File exists: False\n")
    else:
        write = "require('fs').writeFileSync('/tmp/data.txt','hello'); console.log('File written')"
        check = "console.log('File exists:', require('fs').existsSync('/tmp/data.txt'))"
        expect = ("File written\n", "File exists: false\n")
    first = executor.execute(write, language=language)
    second = executor.execute(check, language=language)
    assert (first.stdout, second.stdout) == expect
    assert first.sandbox_id != second.sandbox_id


@pytest.mark.parametrize("language", ["python", "javascript"])
def test_seed_global_variable_does_not_persist(executor: Executor, language: str) -> None:
    if language == "python":
        set_, get = (
            "import builtins; builtins.counter = 1; print('Counter:', builtins.counter)",
            ("import builtins; print('Counter:', getattr(builtins, 'counter', 'undefined'))"),
        )
    else:
        set_, get = (
            "global.counter = 1; console.log('Counter:', global.counter)",
            "console.log('Counter:', global.counter)",
        )
    assert executor.execute(set_, language=language).stdout == "Counter: 1\n"
    assert executor.execute(get, language=language).stdout == "Counter: undefined\n"


def test_seed_runtime_install_does_not_persist_javascript(executor: Executor) -> None:
    # What `npm install lodash` leaves behind: a package under node_modules (the
    # sandbox has no network, so the package is installed from a local folder).
    install = """
const fs = require('fs');
fs.mkdirSync('/work/node_modules/lodash', {recursive: true});
fs.writeFileSync('/work/node_modules/lodash/index.js', 'module.exports = {VERSION: "4.17.21-local"};');
fs.writeFileSync('/work/node_modules/lodash/package.json', '{"name":"lodash","main":"index.js"}');
console.log('Package installed', require('lodash').VERSION);
"""
    assert executor.execute(install).stdout == "Package installed 4.17.21-local\n"
    r = executor.execute("require('lodash')")
    assert r.exit_code == 1 and "Cannot find module 'lodash'" in r.stderr


def test_seed_runtime_install_does_not_persist_python(executor: Executor) -> None:
    # What `pip install --user` leaves behind: a module in the user site directory.
    install = """
import os, site, importlib
d = site.getusersitepackages()
os.makedirs(d, exist_ok=True)
open(os.path.join(d, 'tinypkg.py'), 'w').write('VERSION = "1.0"')
site.addsitedir(d)
print('Package installed', importlib.import_module('tinypkg').VERSION)
"""
    assert executor.execute(install, language="python").stdout == "Package installed 1.0\n"
    r = executor.execute("import tinypkg", language="python")
    assert r.exit_code == 1 and "No module named 'tinypkg'" in r.stderr


def test_each_run_gets_a_new_container_that_is_removed(executor: Executor, engine: Engine) -> None:
    ids = [executor.execute("echo $HOSTNAME", language="bash").sandbox_id for _ in range(3)]
    assert len(set(ids)) == 3
    assert executor.drain()
    for sid in ids:
        with pytest.raises(EngineError):
            engine.state(sid)


def test_distinct_uid_per_run(executor: Executor) -> None:
    uids = {executor.execute("id -u", language="bash").stdout.strip() for _ in range(4)}
    assert len(uids) == 4
    assert all(int(u) >= 1000 for u in uids)


def test_context_manager_and_close(engine: Engine) -> None:
    with Executor(engine=engine) as ex:
        assert ex.execute("print(6*7)", language="python").stdout == "42\n"
    from execbox import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        ex.execute("print(1)", language="python")


def test_program_semantics_are_those_of_a_fresh_process(executor: Executor) -> None:
    # Whether the runtime was started ahead of the request (pool) or not, the
    # program is the main module of a fresh process.
    py = executor.execute(
        "import sys, os\nprint(__name__, sys.argv, sys.path[0], __file__, os.getcwd())\nraise KeyError('k')",
        language="python",
    )
    assert py.stdout == "__main__ ['main.py'] /work /work/main.py /work\n"
    assert py.exit_code == 1
    assert py.stderr.startswith('Traceback (most recent call last):\n  File "/work/main.py", line 3')
    assert "execbox" not in py.stderr and py.stderr.endswith("KeyError: 'k'\n")
    js = executor.execute(
        "console.log(require.main === module, process.argv.length, process.argv[1], __filename);"
        "process.exitCode = 3; setTimeout(() => console.log('later'), 50)"
    )
    assert js.stdout == "true 2 /work/main.js /work/main.js\nlater\n" and js.exit_code == 3
    err = executor.execute("function f() { throw new TypeError('bad') }\nf()")
    assert err.exit_code == 1 and "TypeError: bad" in err.stderr and "at f (/work/main.js:1" in err.stderr
    assert "execbox" not in err.stderr


def test_startup_environment_variables_take_effect(executor: Executor) -> None:
    # Variables read at interpreter start-up work as for a normal start.
    r = executor.execute(
        "import sys; print(sys.flags.optimize, sys.path[1])",
        {"PYTHONOPTIMIZE": "2", "PYTHONPATH": "/work/lib"},
        language="python",
    )
    assert r.stdout == "2 /work/lib\n"
    r = executor.execute(
        "console.log(process.execArgv.length, process.env.NODE_OPTIONS)", {"NODE_OPTIONS": "--no-warnings"}
    )
    assert r.stdout == "0 --no-warnings\n"


def test_exit_behaviour_threads_atexit_and_unclosed_files(executor: Executor) -> None:
    code = """
import atexit, sys, threading, time
f = open('/work/out.txt', 'w')
f.write('unflushed')                       # never closed: flushed at exit
atexit.register(lambda: print('atexit ran', open('/work/out.txt').read() == '', flush=True))
def late():
    time.sleep(0.2)
    print('thread done', flush=True)
threading.Thread(target=late).start()      # non-daemon: exit waits for it
class D:
    def __del__(self):
        print('finalizer', flush=True)
d = D()
sys.exit('bye')
"""
    r = executor.execute(code, language="python")
    assert r.exit_code == 1 and r.stderr == "bye\n"
    assert r.stdout == "thread done\natexit ran True\nfinalizer\n"
    check = executor.execute(
        "f = open('/work/o', 'w'); f.write('x' * 5000)\nimport atexit\natexit.register(lambda: None)",
        language="python",
    )
    assert check.exit_code == 0
    js = executor.execute("process.on('exit', c => console.log('exit', c)); process.exitCode = 9")
    assert (js.stdout, js.exit_code) == ("exit 9\n", 9)
