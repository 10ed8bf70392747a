# Sourced by bin/mlxring and bin/test: create .venv on first use and install the project.
# Re-installs when pyproject.toml is newer than the stamp, so a pull that adds a dependency just works.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mlxring-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "mlxring: setting up $venv (first run only)..." >&2
    if command -v uv >/dev/null 2>&1; then
        [ -x "$venv/bin/python" ] || uv venv -q "$venv" >&2
        uv pip install -q --python "$venv/bin/python" -e "$root[test]" >&2
    else
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
        "$venv/bin/python" -m pip install -q --upgrade pip >&2 2>/dev/null || true
        "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
    fi
    touch "$stamp"
fi
