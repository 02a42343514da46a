# meshbroker: a static binary on a minimal image, run as uid 1000.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG GIT_SHA=unknown
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/meshbroker . \
 && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/meshbroker /meshbroker
COPY --from=build --chown=65532:65532 /out/data /data
ARG GIT_SHA=unknown
ENV GIT_SHA=$GIT_SHA BROKER_PORT=7900 DATA_DIR=/data
USER 65532:65532
EXPOSE 7900
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 CMD ["/meshbroker", "healthcheck"]
ENTRYPOINT ["/meshbroker"]
