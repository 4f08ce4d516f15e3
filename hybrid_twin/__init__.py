"""hybrid_twin: the core library of the hybrid digital twin (torch + torchdiffeq only).

Data flow: flowsheet spec -> `build_flowsheet` (mechanistic units + streams) ->
`HybridVectorField` (+ `ResidualNet`) -> `build_solver` / `integrate_zoh` over zero-order-held
inputs -> `ObservationModel` -> predicted PAT tags. Everything a scripted twin needs
(vector field, observation model, normalisers, solvers) compiles with `torch.jit.script`.
"""

from hybrid_twin.errors import ConfigError as ConfigError
from hybrid_twin.errors import ShapeError as ShapeError
from hybrid_twin.errors import SolverError as SolverError
from hybrid_twin.errors import TwinError as TwinError
from hybrid_twin.estimation import ExtendedKalmanFilter as ExtendedKalmanFilter
from hybrid_twin.estimation import FilterStep as FilterStep
from hybrid_twin.flowsheet import Flowsheet as Flowsheet
from hybrid_twin.flowsheet import build_flowsheet as build_flowsheet
from hybrid_twin.flowsheet import check_unit_shapes as check_unit_shapes
from hybrid_twin.flowsheets import FLOWSHEETS as FLOWSHEETS
from hybrid_twin.flowsheets import cascaded_tanks_flowsheet_spec as cascaded_tanks_flowsheet_spec
from hybrid_twin.flowsheets import cdc_line_flowsheet_spec as cdc_line_flowsheet_spec
from hybrid_twin.hybrid import KINDS as KINDS
from hybrid_twin.hybrid import HybridVectorField as HybridVectorField
from hybrid_twin.hybrid import ModelConfig as ModelConfig
from hybrid_twin.hybrid import Normaliser as Normaliser
from hybrid_twin.hybrid import ObservationModel as ObservationModel
from hybrid_twin.hybrid import default_normalisers as default_normalisers
from hybrid_twin.monitoring import InnovationMonitor as InnovationMonitor
from hybrid_twin.monitoring import MonitorDataError as MonitorDataError
from hybrid_twin.monitoring import MonitorState as MonitorState
from hybrid_twin.monitoring import MonitorStep as MonitorStep
from hybrid_twin.monitoring import chi2_quantile as chi2_quantile
from hybrid_twin.monitoring import fit_monitor as fit_monitor
from hybrid_twin.residual import ResidualConfig as ResidualConfig
from hybrid_twin.residual import ResidualNet as ResidualNet
from hybrid_twin.solvers import RK4 as RK4
from hybrid_twin.solvers import SOLVERS as SOLVERS
from hybrid_twin.solvers import AbstractZOHSolver as AbstractZOHSolver
from hybrid_twin.solvers import Dopri5 as Dopri5
from hybrid_twin.solvers import Euler as Euler
from hybrid_twin.solvers import SolverStatus as SolverStatus
from hybrid_twin.solvers import ZOHSolution as ZOHSolution
from hybrid_twin.solvers import build_solver as build_solver
from hybrid_twin.solvers import check_status as check_status
from hybrid_twin.solvers import integrate_zoh as integrate_zoh
from hybrid_twin.specs import InputSpec as InputSpec
from hybrid_twin.specs import OutputSpec as OutputSpec
from hybrid_twin.specs import ParameterSet as ParameterSet
from hybrid_twin.specs import ParamSpec as ParamSpec
from hybrid_twin.specs import StateSpec as StateSpec
from hybrid_twin.units import UNITS as UNITS
from hybrid_twin.units import AbstractUnit as AbstractUnit
from hybrid_twin.units import CascadedTanks as CascadedTanks
from hybrid_twin.units import LinearStateSpace as LinearStateSpace
from hybrid_twin.units import LossInWeightFeeder as LossInWeightFeeder
from hybrid_twin.units import TabletPress as TabletPress
from hybrid_twin.units import TanksInSeriesBlender as TanksInSeriesBlender
from hybrid_twin.zoh import ZeroOrderHold as ZeroOrderHold
from hybrid_twin.zoh import odeint_zoh as odeint_zoh
