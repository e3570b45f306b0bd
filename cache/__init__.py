"""The contract between the stages: the self-describing layer-token cache.

Imports only ``mettle.manifests``; both ``mettle.extract`` (writer) and ``mettle.train`` (reader)
import it. The storage format lands here with the cache issue (see README, "Status").
"""
