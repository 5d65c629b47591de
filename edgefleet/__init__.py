"""edgefleet: ship signed, compressed TFLite models to fleets of edge devices and keep them healthy.

This package is what the server, the device agent and the operator CLI share: the generated gRPC code
(`edgefleet.v1`), the signed-metadata glue (`signing`), model inspection (`modelinfo`), the interpreter
runtimes (`runtime`), durable file writes (`durable`) and the error tree (`errors`).
"""

__version__ = "0.1.0"
