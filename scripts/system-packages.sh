#!/usr/bin/env bash
# Installs the Debian packages the tests use as real peers (HAProxy for the PROXY protocol,
# swaks as an SMTP client, openssl for TLS probes, redis-server for the plugins that keep
# shared state, spamd, clamd and rspamd for the content scanners, bsdtar for the
# attachment plugin, the Public Suffix List for uribl), when they are missing and we are root.
# Without root the tests that need a missing tool are reported as skipped, with the reason.
set -euo pipefail
need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# spamd (SpamAssassin) for the spamassassin plugin's tests; its rules ship in the package
[ -x /usr/sbin/spamd ] || command -v spamd >/dev/null 2>&1 || need+=(spamd)
# clamd (ClamAV) for the clamd plugin's tests, which bring their own signatures
[ -x /usr/sbin/clamd ] || command -v clamd >/dev/null 2>&1 || need+=(clamav-daemon)
# bsdtar (libarchive) for the attachment plugin, which looks into archives with it
command -v bsdtar >/dev/null 2>&1 || need+=(libarchive-tools)
# rspamd for the rspamd plugin's tests (its normal worker alone, run by the tests)
command -v rspamd >/dev/null 2>&1 || need+=(rspamd)
# the Public Suffix List (the uribl plugin's top-level domains and registered domains)
[ -f /usr/share/publicsuffix/public_suffix_list.dat ] || need+=(publicsuffix)
# swaks speaks TLS through these Perl modules
perl -MIO::Socket::SSL -e 1 >/dev/null 2>&1 || need+=(libio-socket-ssl-perl libnet-ssleay-perl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-packages: not root; missing: ${need[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
