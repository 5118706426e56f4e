"""transcend: any-to-any VM replication and disaster recovery on Temporal."""

__version__ = "0.1.0"
