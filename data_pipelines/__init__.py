"""data_pipelines: historian export -> validated, aligned, split dataset (pandas + pyarrow).

Data flow, one function per arrow: read_historian -> validate -> align_runs -> split_runs /
normalisation -> write_dataset; prepare_dataset chains them for `twin prepare`. This package
never imports torch or hybrid_twin (DESIGN.md).
"""

from data_pipelines.align import Segment as Segment
from data_pipelines.align import align_runs as align_runs
from data_pipelines.dataset import normalisation as normalisation
from data_pipelines.dataset import sha256_file as sha256_file
from data_pipelines.dataset import split_runs as split_runs
from data_pipelines.dataset import write_dataset as write_dataset
from data_pipelines.errors import ConfigError as ConfigError
from data_pipelines.errors import DataPipelineError as DataPipelineError
from data_pipelines.errors import DataValidationError as DataValidationError
from data_pipelines.errors import RowAccountingError as RowAccountingError
from data_pipelines.historian import HistorianTable as HistorianTable
from data_pipelines.historian import read_historian as read_historian
from data_pipelines.prepare import DataConfig as DataConfig
from data_pipelines.prepare import prepare_dataset as prepare_dataset
from data_pipelines.runs import read_runs as read_runs
from data_pipelines.tags import TagDictionary as TagDictionary
from data_pipelines.tags import TagSpec as TagSpec
from data_pipelines.validate import REASONS as REASONS
from data_pipelines.validate import ValidationResult as ValidationResult
from data_pipelines.validate import validate as validate
