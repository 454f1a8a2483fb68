"""Pattern matching on captured graphs: built-in families, user registration, the report."""
from .base import AnalysisContext, Pattern, register_pattern, registered_patterns, unregister_pattern
from .report import PatternReport, analyze_graph

__all__ = ["AnalysisContext", "Pattern", "PatternReport", "analyze_graph", "register_pattern",
           "registered_patterns", "unregister_pattern"]
