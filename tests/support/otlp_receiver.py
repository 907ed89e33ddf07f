"""An OTLP receiver for the tests, built from the official protobuf definitions
(the opentelemetry-proto package): OTLP/HTTP (protobuf bodies on /v1/logs and
/v1/metrics) or OTLP/gRPC on 127.0.0.1, on a port the kernel picks.

Usage: otlp_receiver.py http|grpc accept|count|stall

It prints `listening PORT`, then one JSON line per request it accepted:
{"kind": "logs"|"metrics", "headers": {...}, "request": <the request as JSON>}.
With `count` it parses each request and prints nothing (cargo xtask bench); with `stall` it
takes requests and never answers them, as a hung collector does.
"""
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

PROTOCOL, MODE = sys.argv[1], sys.argv[2]
STALL = threading.Event()  # never set
OUT = threading.Lock()


def emit(kind, headers, request):
    if MODE == "count":
        return
    line = json.dumps({"kind": kind, "headers": headers, "request": MessageToDict(request)})
    with OUT:
        print(line, flush=True)


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if MODE == "stall":
            STALL.wait()
        kinds = {
            "/v1/logs": ("logs", logs_service_pb2.ExportLogsServiceRequest,
                         logs_service_pb2.ExportLogsServiceResponse),
            "/v1/metrics": ("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                            metrics_service_pb2.ExportMetricsServiceResponse),
        }
        if self.path not in kinds:
            self.send_response(404)
            self.end_headers()
            return
        kind, request_type, response_type = kinds[self.path]
        request = request_type()
        request.ParseFromString(body)
        emit(kind, {k.lower(): v for k, v in self.headers.items()}, request)
        reply = response_type().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        if MODE == "stall":
            STALL.wait()
        emit("logs", dict(context.invocation_metadata()), request)
        return logs_service_pb2.ExportLogsServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        if MODE == "stall":
            STALL.wait()
        emit("metrics", dict(context.invocation_metadata()), request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


if PROTOCOL == "http":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()
else:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()
