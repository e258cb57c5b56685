#!/bin/sh
# The Redis pod's init container: render users.acl.template into the ACL file Redis loads (aclfile in
# redis.conf), with each @<USER>_SHA256@ replaced by the sha256 of that user's password. The passwords
# come from the Secret instructloop-redis-users (env REDIS_PASSWORD_<USER>); the file holds only hashes and
# lives on a memory-backed emptyDir, readable by Redis alone.
set -eu
umask 077
out="${ACL_FILE:-/run/redis/users.acl}"
expressions="-e /^#/d"
for user in GATEWAY LEARNER SERVE EXPORTER PROBE ADMIN; do
  eval "password=\${REDIS_PASSWORD_${user}:-}"
  if [ -z "$password" ]; then
    name=$(echo "$user" | tr 'A-Z' 'a-z')
    echo "the Secret instructloop-redis-users has no (or an empty) key '$name': create it as docs/deploy.md says" >&2
    exit 1
  fi
  hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
  expressions="$expressions -e s/@${user}_SHA256@/${hash}/"
done
# shellcheck disable=SC2086 # the expressions are hex digests and fixed words: split on purpose
sed $expressions /etc/redis/users.acl.template > "$out"
if grep -q '@[A-Z]*_SHA256@' "$out"; then
  echo "users.acl.template names a user render-acl.sh does not know" >&2
  exit 1
fi
echo "wrote $out ($(grep -c '^user ' "$out") users)"
