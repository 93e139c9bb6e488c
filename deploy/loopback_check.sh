#!/usr/bin/env bash
# `ray up` / `ray submit` / `ray down` end to end with deploy/onprem.yaml pointed at THIS machine
# over SSH on 127.0.0.1 (head only). A manual check, not part of CI: it needs an SSH server on
# port 22 that accepts this user's key, rsync, and it stops any Ray running on this machine.
#
#   bash deploy/loopback_check.sh            # from the repository root, in the project's virtualenv
set -euo pipefail
cd "$(dirname "$0")/.."
key="${KEY:-$HOME/.ssh/cxr_loopback}"
mkdir -p ~/.ssh && chmod 700 ~/.ssh
[ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -f "$key"
grep -qF "$(cat "$key.pub")" ~/.ssh/authorized_keys 2>/dev/null || cat "$key.pub" >> ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
ssh -i "$key" -o StrictHostKeyChecking=no -o BatchMode=yes "$(whoami)@127.0.0.1" true  # SSH works?

cfg="$(mktemp -d)/onprem-loopback.yaml"
python - "$cfg" "$key" <<'PY'
import getpass, sys, yaml
c = yaml.safe_load(open("deploy/onprem.yaml"))
c["provider"].update(head_ip="127.0.0.1", worker_ips=[])
c["auth"].update(ssh_user=getpass.getuser(), ssh_private_key=sys.argv[2])
c["max_workers"] = 0
yaml.safe_dump(c, open(sys.argv[1], "w"), sort_keys=False)
PY
trap 'ray down -y "$cfg" || true' EXIT
# the cluster files turn on Ray's token authentication: its token must exist before `ray up`
[ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
chmod 600 ~/.ray/auth_token
ray up -y "$cfg"
ray submit "$cfg" experiments/tune.py -- --demo --set tune.num_samples=2 --set train.epochs=2 \
    --set tune.name=loopback_demo
ray exec "$cfg" 'ls ~/runs/loopback_demo/best && head -3 ~/runs/loopback_demo/trials.csv'
