"""AWS EC2 with EBS direct: source and target (docs/platforms/aws.md)."""
