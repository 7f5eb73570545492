# pgshift proxy image: `docker run -v $PWD/config.toml:/etc/pgshift/config.toml -p 6432:6432 pgshift`
FROM python:3.11-slim

WORKDIR /opt/pgshift
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home pgshift

USER pgshift
EXPOSE 6432
# Listen on all interfaces inside the container: set [listen] host = "0.0.0.0" in the mounted config.
ENTRYPOINT ["pgshift"]
CMD ["serve", "--config", "/etc/pgshift/config.toml"]
