"""The chain core: transform protocol, chain value, plan, bucket, numerics and ChainOptimizer."""
