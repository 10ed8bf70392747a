# Sourced by bin/mlxring and bin/test: create .venv on first use and install the project.
# Re-installs when pyproject.toml is newer than the stamp, so a pull that adds a dependency just works.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mlxring-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "mlxring: installing into $venv (first run only, about a minute)..." >&2
    log="$root/.venv-install.log"
    if command -v uv >/dev/null 2>&1; then
        { [ -x "$venv/bin/python" ] || uv venv -q "$venv"; } >"$log" 2>&1 &&
            uv pip install --python "$venv/bin/python" -e "$root[test]" >>"$log" 2>&1
    else
        { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } >"$log" 2>&1 &&
            "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[test]" >>"$log" 2>&1
    fi || { tail -n 30 "$log" >&2; echo "mlxring: install failed (full log: $log)" >&2; exit 1; }
    touch "$stamp"
fi
