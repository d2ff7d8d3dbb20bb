"""The operator CLI `bulkhead`: a thin client of the controller's AdminService.

Modules: main (commands), client (gRPC channel, calls, error mapping), documents (YAML
loading), labels (label argument parsing), output and tables (formatting), errors.
"""
