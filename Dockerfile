# pgshift proxy image: `docker run -v $PWD/config.toml:/etc/pgshift/config.toml -p 6432:6432 pgshift`
FROM python:3.11-slim

WORKDIR /opt/pgshift
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home pgshift \
    && mkdir -p /var/lib/pgshift && chown pgshift /var/lib/pgshift

USER pgshift
# Routing versions and the dual-write journal survive the container: set [control] state_file =
# "/var/lib/pgshift/state.jsonl" and [mirror] journal = "/var/lib/pgshift/mirror.jsonl" in the
# mounted config (or use a shared [control] store).
VOLUME /var/lib/pgshift
EXPOSE 6432 9187
# Listen on all interfaces inside the container: set [listen] host = "0.0.0.0" in the mounted config;
# an [admin] host of "0.0.0.0" also needs [admin] token = "env:PGSHIFT_ADMIN_TOKEN" (docker run -e).
ENTRYPOINT ["pgshift"]
CMD ["serve", "--config", "/etc/pgshift/config.toml"]
