"""The code sandbox against hostile programs: every escape of issue 14 and the ones
that stay contained. Each hostile program tries its escape, tolerating refusals, and
ends by asserting what only a successful escape makes true, so it must not pass; the
host side then checks that nothing happened (files, signals, connections, secrets)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import needs_bwrap, one_line

from tropd.tasks import Item, sandbox
from tropd.tasks.sandbox import Limits, run_program
from tropd.tasks.sources import SourceTask
from tropd.tasks.verifiers import code_score

LIMITS = Limits(timeout_s=3.0, memory_mb=512, file_size_mb=2, scratch_mb=4, processes=8)
REPO = Path(__file__).parents[2]
SECRET_NAME = "TROPD_SANDBOX_TEST_SECRET"
ITEM = Item("write add", "", tests="assert add(2, 3) == 5", meta={"entry_point": "add"})

# Tries `fn`, printing a refusal instead of failing: the program goes on to its next try.
PRELUDE = """\
import os, sys
def attempt(fn, *args):
    try:
        return fn(*args)
    except BaseException as err:
        print("refused:", type(err).__name__, err)
"""

HOSTILE = {
    # The audit hook of the old sandbox is gone; what it guarded now meets the OS.
    "os_system_ctypes_subprocess": """
import ctypes, subprocess
attempt(os.system, "rm -f {victim}; echo x > {victim_dir}/{new}")
attempt(lambda: ctypes.CDLL(None).system(b"rm -f {victim}"))
attempt(subprocess.run, ["rm", "-f", "{victim}"])
assert open("{victim}").read() == "keep me"  # it sees the host file
""",
    "dir_fd_write_and_unlink": """
def via(base):
    d = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(os.path.relpath("{victim_dir}/{new}", base), os.O_CREAT | os.O_WRONLY, dir_fd=d)
    os.write(fd, b"x")
    os.unlink(os.path.relpath("{victim}", base), dir_fd=d)
for base in ("/", "{victim_dir}", "/proc/1/root", "/proc/self/cwd/.."):
    attempt(via, base)
assert os.path.exists("{victim_dir}/{new}")
""",
    "mkfifo_mknod": """
import stat
attempt(os.mkfifo, "{victim_dir}/{new}")
attempt(os.mknod, "{victim_dir}/{new}.null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
attempt(os.mknod, "disk", stat.S_IFBLK | 0o666, os.makedev(8, 0))
assert open("disk", "rb").read(512)  # a raw disk
""",
    "network": """
import socket
sent = []
def tcp():
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"pwned")
    sent.append("tcp")
def udp(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendmsg([b"pwned"], [], 0, (host, {port}))
    sent.append(host)
attempt(tcp)
attempt(udp, "127.0.0.1")
attempt(udp, "8.8.8.8")
print("interfaces:", socket.if_nameindex())
assert "tcp" in sent  # the sandbox has a loopback of its own: UDP to it goes nowhere
""",
    "signal_the_trainer": """
import signal
for pid in ({trainer_pid}, os.getppid(), 1):
    attempt(os.kill, pid, signal.SIGUSR1)
    attempt(lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGUSR1))
attempt(os.kill, -1, signal.SIGUSR1)
print("processes it sees:", os.listdir("/proc"))
assert os.path.exists("/proc/{trainer_pid}")
""",
    "environ_of_the_parent": """
import glob
key = "TROPD_SANDBOX" + "_TEST_SECRET="
found = [str(os.environ).encode()]
paths = ["/proc/{trainer_pid}/environ", f"/proc/{{os.getppid()}}/environ"]
for path in paths + glob.glob("/proc/*/environ") + glob.glob("/proc/*/task/*/environ"):
    found.append(attempt(lambda: open(path, "rb").read()) or b"")
blob = b"".join(found)
print(blob[-3000:])
assert key.encode() in blob
""",
    "home_and_ssh_keys": """
import glob
read = []
paths = ["{home_secret}", os.path.expanduser("~/.ssh/id_rsa"), "/root/.ssh/id_rsa",
         "/root/.ssh/authorized_keys", "/etc/shadow", "/etc/passwd", "{repo}/pyproject.toml"]
for path in paths + glob.glob("/home/*/.ssh/*") + glob.glob("/root/.ssh/*"):
    read.append(attempt(lambda: open(path, "rb").read()) or b"")
print(b"".join(read)[-3000:])
attempt(os.listdir, "{repo}")
assert any(read)
""",
    "host_writes": """
import shutil
paths = ["{repo}/{new}", "{host_tmp}/{new}", "{victim}", os.path.expanduser("~/{new}"),
         "/{new}", "/usr/{new}", "/dev/{new}", "/dev/shm/{new}", "/proc/{new}", "/etc/{new}"]
for path in paths:
    attempt(lambda: open(path, "w").write("x"))
attempt(shutil.rmtree, "{victim_dir}")
assert os.path.exists("{repo}/pyproject.toml")  # it sees the repository
""",
    "marker_from_argv_env_files_fds": """
import glob, re
def peek(path):  # without blocking on pipes and FIFOs
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)
seen = [" ".join(sys.argv), str(os.environ)]
paths = ["/proc/self/cmdline", "/proc/self/environ", "/proc/1/cmdline", "/proc/1/environ"]
for path in paths + glob.glob("/proc/*/cmdline") + glob.glob("/tmp/*") + glob.glob("/*"):
    seen.append(str(attempt(peek, path)))
seen.append(str(attempt(os.read, 0, 4096)))
for fd in os.listdir("/proc/self/fd"):
    seen.append(str(attempt(peek, f"/proc/self/fd/{{fd}}")))
text = " ".join(seen)
guesses = set(re.findall(r"[0-9a-f]{{16,}}", text)) | {{"passed", "0"}}
for fd in range(3, 64):
    for guess in guesses:
        attempt(os.write, fd, f"\\n{{guess}}\\n".encode())
os._exit(0)
""",
    "chmod_000_and_immutable_subfolder": """
import array, fcntl
os.makedirs("locked/inner")
open("locked/inner/file", "w").write("x")
fd = os.open("locked/inner/file", os.O_RDONLY)
attempt(fcntl.ioctl, fd, 0x40086602, array.array("l", [0x10]))  # FS_IOC_SETFLAGS immutable
os.chmod("locked/inner", 0)
os.chmod("locked", 0)
print("scratch:", os.getcwd())
assert os.path.exists("{victim_dir}/{new}")
""",
    "scratch_size_cap": """
for i in range(16):  # 16 MiB into a 4 MiB scratch, 1 MiB per file (the file limit is 2)
    with open(f"fill{{i}}", "wb") as f:
        f.write(b"x" * 2**20)
""",
    "file_size_cap": """
with open("big", "wb") as f:
    f.write(b"x" * 3 * 2**20)
""",
    "fork_bomb": """
import time
forks = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        forks += 1
except OSError as err:
    print("forks:", forks, err)
assert forks > 100
""",
    "fork_bomb_forever": """
while True:
    try:
        os.fork()
    except OSError:
        pass
""",
    "memory_hog": """
hog = []
while True:
    hog.append(bytearray(10**7))
""",
    "infinite_loop": """
while True:
    pass
""",
    "exit_early_os_exit": "os._exit(0)\nassert False",
    "exit_early_sys_exit": "sys.exit(0)\nassert False",
    "exit_early_system_exit": "raise SystemExit\nassert False",
    "exit_early_kill_itself": "import signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert False",
}

# Expected status per case (any status but "passed" where None), and what it must print.
EXPECTED = {
    "scratch_size_cap": ("error", "No space left on device"),
    "file_size_cap": ("error", "File too large"),
    "fork_bomb": ("failed", "forks: "),
    "fork_bomb_forever": ("timeout", ""),
    "memory_hog": ("memory", ""),
    "infinite_loop": ("timeout", ""),
    "exit_early_os_exit": ("exited", ""),
    "exit_early_sys_exit": ("exited", ""),
    "exit_early_system_exit": ("exited", ""),
    "exit_early_kill_itself": ("error", ""),
}


@pytest.fixture
def host(tmp_path, monkeypatch):
    """What a hostile program goes after: a file to delete, a folder to write into, a
    secret in the trainer's environment and home, a listening port, the trainer's pid."""
    secret = uuid.uuid4().hex
    monkeypatch.setenv(SECRET_NAME, secret)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    home_secret = Path.home() / f".tropd-sandbox-test-{uuid.uuid4().hex}"
    home_secret.write_text(f"key {secret}")
    signals = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signals.append(1))
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    try:
        yield SimpleNamespace(
            victim=victim,
            victim_dir=tmp_path,
            new=f"escaped-{uuid.uuid4().hex}",
            secret=secret,
            home_secret=home_secret,
            port=tcp.getsockname()[1],
            trainer_pid=os.getpid(),
            repo=REPO,
            host_tmp=tempfile.gettempdir(),
            signals=signals,
            tcp=tcp,
            udp=udp,
        )
    finally:
        signal.signal(signal.SIGUSR1, previous)
        tcp.close()
        udp.close()
        home_secret.unlink()


def nothing_escaped(host, result) -> None:
    """The host side: files, signals, connections and secrets untouched."""
    assert host.victim.read_text() == "keep me"
    assert sorted(p.name for p in host.victim_dir.iterdir()) == ["victim.txt"]
    for folder in (REPO, Path(host.host_tmp), Path.home(), Path("/"), Path("/usr"), Path("/etc")):
        assert not (folder / host.new).exists()
    assert host.signals == []
    host.tcp.settimeout(0.05)
    with pytest.raises(TimeoutError):
        host.tcp.accept()
    host.udp.settimeout(0.05)
    with pytest.raises(TimeoutError):
        host.udp.recv(100)
    assert host.secret not in result.output


def sandbox_processes() -> set[str]:
    """Processes of the sandbox's uids (as root: 2**30 and up; other users: none to tell)."""
    found = set()
    if os.geteuid() == 0:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except FileNotFoundError:
                continue
            if uid >= 2**30:
                found.add(f"pid {pid} uid {uid}")
    return found


@needs_bwrap
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_programs_are_contained(case, host):
    before = sandbox_processes()
    program = PRELUDE + HOSTILE[case].format(**vars(host))
    started = time.perf_counter()
    result = run_program(program, LIMITS)
    assert time.perf_counter() - started < LIMITS.timeout_s + 3, "not killed in time"
    status, printed = EXPECTED.get(case, (None, ""))
    assert result.status != "passed", result.output
    if status is not None:
        assert result.status == status, result.output
    assert printed in result.output
    if case == "fork_bomb":  # it got no more processes than the limit
        forks = int(result.output.split("forks: ")[1].split()[0])
        assert forks < LIMITS.processes
    nothing_escaped(host, result)
    time.sleep(0.2)  # the kernel reaps a killed namespace asynchronously
    assert sandbox_processes() <= before


@needs_bwrap
@pytest.mark.parametrize("case", ["marker_from_argv_env_files_fds", "exit_early_os_exit"])
def test_a_program_cannot_forge_a_pass_on_failing_tests(case, host):
    wrong = "def add(a, b):\n    return 0\n" + PRELUDE + HOSTILE[case].format(**vars(host))
    right = "def add(a, b):\n    return a + b\n"
    assert code_score(f"```python\n{wrong}```", ITEM, LIMITS) == 0.0
    assert code_score(f"```python\n{right}```", ITEM, LIMITS) == 1.0


@needs_bwrap
def test_contained_programs_still_work(host):
    program = (
        "import json, os, subprocess, threading\n"
        "assert os.getcwd() == os.environ['HOME'] == '/tmp'\n"
        f"assert {SECRET_NAME!r} not in os.environ\n"
        "os.makedirs('sub', exist_ok=True)\n"
        "json.dump({'a': 1}, open('sub/x.json', 'w'))\n"
        "assert json.load(open('sub/x.json')) == {'a': 1}\n"
        "threads = [threading.Thread(target=sum, args=([1, 2],)) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert subprocess.run(['true']).returncode == 0\n"
        "print('all good')\n"
    )
    result = run_program(program, LIMITS)
    assert result.status == "passed", result.output
    assert "all good" in result.output
    nothing_escaped(host, result)


def test_without_bwrap_generated_code_is_refused_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED, raising=False)
    with pytest.raises(ValueError) as error:
        run_program("print(1)", LIMITS)
    message = one_line(error)
    assert "apt-get install bubblewrap" in message and sandbox.ALLOW_UNSANDBOXED in message
    with pytest.raises(ValueError, match="needs a sandbox"):  # a code task, before any model
        SourceTask("code", [ITEM], [], verifier="code")
    monkeypatch.setenv(sandbox.ALLOW_UNSANDBOXED, "1")
    assert run_program("print(1)", LIMITS).status == "passed"


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("exit_early_os_exit", "exited"),
        ("exit_early_sys_exit", "exited"),
        ("marker_from_argv_env_files_fds", "exited"),
        ("chmod_000_and_immutable_subfolder", "failed"),
        ("memory_hog", "memory"),
        ("infinite_loop", "timeout"),
    ],
)
def test_the_opted_in_unsandboxed_runner_keeps_its_verdict_and_cleans_up(
    case, status, host, monkeypatch
):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    monkeypatch.setenv(sandbox.ALLOW_UNSANDBOXED, "1")
    source = HOSTILE[case]
    if case.startswith("chmod"):  # as root it could make a host file immutable for real
        source = source.replace("attempt(fcntl.ioctl", "# attempt(fcntl.ioctl")
    result = run_program(PRELUDE + source.format(**vars(host)), LIMITS)
    assert result.status == status, result.output
    assert host.secret not in result.output
    if case.startswith("chmod"):
        scratch = result.output.split("scratch: ")[1].split()[0]
        assert scratch.startswith(tempfile.gettempdir()) and not os.path.exists(scratch)


UNPRIVILEGED = """
import sys, types
module = types.ModuleType("sandbox")
sys.modules["sandbox"] = module
exec(compile(sys.stdin.read(), "sandbox.py", "exec"), module.__dict__)
limits = module.Limits(timeout_s=3, memory_mb=512, scratch_mb=4, processes=8)
for program in sys.argv[1:]:
    print(module.run_program(program, limits))
"""


@needs_bwrap
@pytest.mark.skipif(
    os.geteuid() != 0 or not (os.path.exists("/usr/bin/python3") and shutil.which("setpriv")),
    reason="needs root, setpriv and /usr/bin/python3 to act as an unprivileged user",
)
def test_an_unprivileged_user_gets_the_same_sandbox(monkeypatch):
    """As a user other than root, bwrap makes a user namespace and the process limit counts
    the sandbox's processes only."""
    fork = "import os, time\nwhile os.fork():\n    pass\ntime.sleep(30)"
    environ = "assert b'SECRET' not in open('/proc/1/environ', 'rb').read()"
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
    done = subprocess.run(
        [*argv, "-c", UNPRIVILEGED, fork, environ, "import os\nos._exit(0)"],
        input=Path(sandbox.__file__).read_text(),
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", f"{SECRET_NAME}": "SECRET"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    statuses = re.findall(r"status='(\w+)'", done.stdout)
    assert statuses == ["error", "passed", "exited"], done.stdout
    assert "Resource temporarily unavailable" in done.stdout
