"""A stand-in for the Kubernetes API server's pod list, for `netwatch agent --kube`: no real
API server installs from Debian 12, and the agent asks it one thing.

Usage: kube_api.py PODLIST.json

It prints `listening PORT`, then one line per request: the path with its query, a tab, and
the Authorization header. GET /api/v1/pods answers the file's PodList; anything else 404.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

with open(sys.argv[1]) as f:
    POD_LIST = f.read().encode()


class Api(BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"{self.path}\t{self.headers.get('Authorization', '')}", flush=True)
        if not self.path.startswith("/api/v1/pods?"):
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(POD_LIST)))
        self.end_headers()
        self.wfile.write(POD_LIST)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Api)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
