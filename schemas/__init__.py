"""The wire: gRPC protos, event types, ClickHouse DDL and topic names. Imports no other servoloop package."""
