#!/bin/sh
# As the official image's 20-envsubst-on-templates.sh: /etc/nginx/templates/X.template becomes
# /etc/nginx/conf.d/X, replacing only variables set in the environment (nginx's own $vars stay).
set -eu
defined=$(printf '${%s} ' $(env | cut -d= -f1))
for template in /etc/nginx/templates/*.template; do
  [ -f "$template" ] || continue
  name=$(basename "$template" .template)
  envsubst "$defined" <"$template" >"/etc/nginx/conf.d/$name"
done
exec "$@"
